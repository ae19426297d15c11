"""Training under tf.distribute and across processes: 2 logical CPU replicas against one device,
loss scaling on one replica's overflow, two loopback workers killed and resumed, ``kill -9`` of
``main.py`` then resume, ``distribute_main.py --process-per-gpu`` against MirroredStrategy."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from training_helpers import subprocess_env as _env
from utils.distribute import free_local_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(ROOT, "tests", "training_helpers.py")


@pytest.fixture(scope="module")
def replicas_run(tmp_path_factory, synth_dir):
    out = tmp_path_factory.mktemp("replicas")
    proc = subprocess.run([sys.executable, HELPERS, "replicas", str(out), synth_dir], env=_env(),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out / "replicas.npz")


@pytest.mark.parametrize("precision, loss_rtol, median_tol, max_tol",
                         [("float32", 1e-6, 1e-4, 2e-3), ("float16", 1e-3, 0.15, 0.5)])
def test_two_logical_cpu_replicas_match_one_device(replicas_run, precision, loss_rtol, median_tol, max_tol):
    """One SGD step on 2 replicas == the same step on 1 device with the same global batch, in
    float32 and under the float16 policy with loss scaling (at a scale where neither overflows).
    Per variable, the relative error of the move ``|d2 - d1| / |d1|`` is measured: float32
    4e-6 (median) and 1.5e-4 (worst), summation order; float16 8% (median) and 29% (worst),
    the precision of float16 gradients. A wrong normalisation (x2) or a replica's gradient left
    out gives 50-100% on every variable."""
    r = replicas_run
    np.testing.assert_allclose(float(r[f"{precision}_loss_two"]), float(r[f"{precision}_loss_one"]), rtol=loss_rtol)
    assert int(r[f"{precision}_skipped_two"]) == int(r[f"{precision}_skipped_one"]) == 0
    n = len([k for k in r.files if k.startswith(f"{precision}_one_")])
    errors = []
    for i in range(n):
        one, two, before = r[f"{precision}_one_{i}"], r[f"{precision}_two_{i}"], r[f"{precision}_before_{i}"]
        assert np.linalg.norm(one - before) > 0, f"variable {i} did not move"
        errors.append(np.linalg.norm((two - before) - (one - before)) / np.linalg.norm(one - before))
    assert np.median(errors) < median_tol and max(errors) < max_tol, (np.median(errors), max(errors))


def test_float16_overflow_on_one_replica_skips_the_update_everywhere(replicas_run):
    """Replica 1's gradient is infinite at step 2 (float16, 2 replicas): no trainable variable
    changes on either replica, the loss scale halves, the optimizer counts only the next step,
    which trains."""
    r = replicas_run
    assert bool(r["overflow_unchanged"])
    assert float(r["overflow_scale_after"]) == float(r["overflow_scale_before"]) / 2
    assert int(r["overflow_skipped"]) == 1 and int(r["overflow_second_skipped"]) == 0
    assert int(r["overflow_iterations"]) == 1
    assert bool(r["overflow_moved"]) and bool(r["overflow_finite_after"])


def test_default_evaluator_under_two_replicas_equals_one_device(replicas_run):
    r = replicas_run
    assert int(r["eval_alone_predicted_people"]) > 0      # the random head finds people
    for k in ("score", "ap50", "predicted_people"):
        assert float(r[f"eval_strategy_{k}"]) == float(r[f"eval_alone_{k}"]), k


def _newest_step(ckpt_dir) -> int:
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(ckpt_dir))
    return int(latest.rsplit("-", 1)[1])


def _start_workers(out, synth_dir, steps, every):
    ports = free_local_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen([sys.executable, HELPERS, "worker", str(out), synth_dir, str(steps), str(every)],
                                      env=_env(TF_CONFIG=tf_config), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs, timeout=300):
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]


def test_two_workers_killed_mid_epoch_resume_together_with_identical_weights(tmp_path, synth_dir):
    """Two loopback workers train; both are killed with kill -9 after a mid-epoch checkpoint and
    restarted with the same command: both resume from the chief's checkpoint at the same step,
    finish on the planned step with identical weights, and evaluate once (on the chief) to the
    score that one device gives with the final weights."""
    steps, every = 24, 3
    ckpts = tmp_path / "run" / "checkpoints"
    procs = _start_workers(tmp_path, synth_dir, steps, every)
    deadline, killed_after = time.time() + 240, None
    while time.time() < deadline and all(p.poll() is None for p in procs):
        saved = sorted(int(os.path.basename(f)[5:-6]) for f in glob.glob(str(ckpts / "ckpt-*.index")))
        if saved and saved[-1] >= 6:
            for p in procs:
                p.send_signal(signal.SIGKILL)
            killed_after = saved[-1]
            break
        time.sleep(0.1)
    for p in procs:
        p.wait(timeout=30)
    assert killed_after is not None and killed_after < steps, "the workers did not reach a mid-epoch checkpoint"
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2
    # the newest *complete* checkpoint (the manager registers one after writing it; a kill in
    # between leaves the previous one newest)
    newest = _newest_step(ckpts)
    assert killed_after - every <= newest <= killed_after

    _wait(_start_workers(tmp_path, synth_dir, steps, every))
    w0, w1 = np.load(tmp_path / "worker0.npz"), np.load(tmp_path / "worker1.npz")
    resumed = int(w0["start_step"])
    assert resumed == newest and resumed % every == 0
    assert int(w1["start_step"]) == resumed                   # worker 1 restored the chief's checkpoint
    assert int(w0["steps"]) == int(w1["steps"]) == steps
    assert int(w0["replicas"]) == 2 and bool(w0["chief"]) and not bool(w1["chief"])
    for k in w0.files:
        if k.startswith("w"):
            np.testing.assert_array_equal(w0[k], w1[k])
    assert glob.glob(str(ckpts / f"ckpt-{steps}.index"))       # only the chief writes the run directory
    # evaluation: the chief's score reached worker 1, and one device gives it from final weights
    from utils.evaluation import evaluate_model
    from utils.predict import load_trained_model

    model, cfg = load_trained_model(str(tmp_path / "run" / "final.weights.h5"))
    alone = evaluate_model(model, cfg)
    assert alone["predicted_people"] > 0 and int(w0["predicted_people"]) == alone["predicted_people"]
    assert float(w0["score"]) == float(w1["score"]) == float(w0["history_score"]) == alone["score"]


def test_kill_minus_9_mid_epoch_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    synth = tmp_path / "synth"
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--run-dir", str(run_dir),
           "--synthetic-dir", str(synth), "--synthetic-train-images", "24", "--synthetic-val-images", "4",
           "--input-height", "64", "--input-width", "64", "--batch-size", "2", "--tiny-width", "8",
           "--tiny-stem-channels", "16", "--head-channels", "16", "--sigma", "1.5", "--tau", "2",
           "--epochs", "2", "--steps-per-epoch", "40", "--checkpoint-every-steps", "5",
           "--log-every-steps", "1"]
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    killed_after = None
    while time.time() < deadline and first.poll() is None:
        saved = glob.glob(str(run_dir / "checkpoints" / "ckpt-*.index"))
        steps = sorted(int(os.path.basename(s)[5:-6]) for s in saved)
        if steps and steps[-1] >= 10:
            first.send_signal(signal.SIGKILL)
            killed_after = steps[-1]
            break
        time.sleep(0.2)
    first.wait(timeout=30)
    assert killed_after is not None and killed_after < 40, "the first run did not reach a mid-epoch checkpoint"
    newest = _newest_step(run_dir / "checkpoints")          # complete and registered at the kill
    assert killed_after - 5 <= newest <= killed_after
    assert first.returncode == -signal.SIGKILL

    second = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    resumed_step = int(result["resumed_from"].rsplit("-", 1)[1])
    assert resumed_step == newest and resumed_step % 5 == 0
    assert "resumed from" in second.stderr and f"step {resumed_step}" in second.stderr
    assert result["steps"] == 80 and result["epochs"] == 2     # same schedule, not restarted
    # the optimizer state came back with the step: its iteration counter equals the global step
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints"))
    names = {n for n, _ in tf.train.list_variables(str(run_dir / "checkpoints"))}
    step_key = next(n for n in names if n.startswith("step/"))
    iter_key = next(n for n in names if n.startswith("optimizer/") and "iteration" in n)
    assert reader.get_tensor(step_key) == 80 and reader.get_tensor(iter_key) == 80


def _trainable_after(run_dir):
    from utils.predict import load_trained_model

    model, _ = load_trained_model(os.path.join(run_dir, "final.weights.h5"))
    return [v.numpy() for v in model.trainable_variables]


def test_process_per_gpu_trains_to_the_weights_of_mirrored_over_two_logical_cpus(tmp_path):
    """``distribute_main.py --process-per-gpu`` (two worker processes launched by the script,
    each with its own input pipeline; CPU here) and ``--cpu-replicas 2`` (MirroredStrategy in one
    process) train 3 SGD steps from the same weights on the same global batches (2 training
    pictures, one per replica, no augmentation) to the same weights, within the tolerance of
    the replica test (per-variable relative error of the move)."""
    from training_helpers import random_head_run

    init = tmp_path / "init"
    random_head_run(str(init), joint_heatmaps=True)          # the preset's three heads
    common = ["--synthetic-dir", str(tmp_path / "synth"), "--synthetic-train-images", "2",
              "--synthetic-val-images", "2", "--input-height", "64", "--input-width", "64",
              "--batch-size", "1", "--tiny-width", "8", "--tiny-stem-channels", "16", "--head-channels", "16",
              "--sigma", "1.5", "--tau", "2", "--epochs", "1", "--steps-per-epoch", "3", "--no-augment",
              "--optimizer", "sgd", "--lr", "1e-2", "--lr-decay-epochs", "", "--lr-schedule", "step",
              "--warmup-steps", "0", "--deterministic",
              "--steps-per-call", "1", "--finetune", str(init / "final.weights.h5"), "--log-every-steps", "1"]
    script = os.path.join(ROOT, "distribute_main.py")
    runs = {"workers": (["--cpu", "--gpus", "0,1", "--process-per-gpu"], "Strategy with 2 replicas"),
            "mirrored": (["--cpu-replicas", "2"], "MirroredStrategy with 2 replicas")}
    for name, (flags, strategy) in runs.items():
        proc = subprocess.run([sys.executable, script, "--run-dir", str(tmp_path / name), *common, *flags],
                              env=_env(), capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout.strip().splitlines()[-1])     # the chief's summary
        assert summary["steps"] == 3, summary
        assert proc.stderr.count(strategy) == (2 if name == "workers" else 1), proc.stderr[-3000:]
    before = _trainable_after(str(init))
    workers, mirrored = _trainable_after(str(tmp_path / "workers")), _trainable_after(str(tmp_path / "mirrored"))
    errors = []
    for b, w, m in zip(before, workers, mirrored):
        assert np.linalg.norm(m - b) > 0
        errors.append(np.linalg.norm((w - b) - (m - b)) / np.linalg.norm(m - b))
    print(f"process-per-gpu vs mirrored, relative error of the move: median {np.median(errors):.2e}, "
          f"worst {max(errors):.2e}")
    assert np.median(errors) < 1e-4 and max(errors) < 2e-3, (np.median(errors), max(errors))
