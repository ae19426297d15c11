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
    assert list(r["overflow_skipped"]) == [2] and int(r["overflow_second_skipped"]) == 0
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


def _start_workers(out, synth_dir, steps, every, mode="worker", log=None):
    ports = free_local_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        stdout = open(log, "w") if (log and index == 0) else subprocess.DEVNULL
        procs.append(subprocess.Popen([sys.executable, HELPERS, mode, str(out), synth_dir, str(steps), str(every)],
                                      env=_env(TF_CONFIG=tf_config), stdout=stdout,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _wait_for(path, text, procs, timeout=240):
    """Until ``text`` appears in the file ``path`` (a process's console), while ``procs`` run."""
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(path) and text in open(path).read():
            return True
        time.sleep(0.1)
    return False


def _saved_steps(ckpts):
    return sorted(int(os.path.basename(f)[5:-6]) for f in glob.glob(str(ckpts / "ckpt-*.index")))


def test_two_workers_preempted_then_killed_resume_together_with_identical_weights(tmp_path, synth_dir):
    """Two loopback workers (MultiWorkerMirroredStrategy). 1: SIGTERM to both, as a scheduler
    preempts: both save the same mid-epoch step, without a mid-epoch checkpoint due, and exit
    with 75; worker 1's checkpoint is in its one scratch folder, not in the run directory. 2: the
    same command resumes there; kill -9 of both after a later mid-epoch checkpoint. 3: the same
    command resumes from the chief's newest complete checkpoint and finishes on the planned step
    with identical weights on both workers, evaluated once (on the chief) to the score that one
    device gives with the final weights."""
    from utils.training import worker_scratch_dir

    steps, every = 60, 20
    ckpts = tmp_path / "run" / "checkpoints"
    log = tmp_path / "chief.log"
    procs = _start_workers(tmp_path, synth_dir, steps, every, log=log)
    assert _wait_for(log, "Epoch 1/1", procs), [p.stderr.read()[-2000:] for p in procs if p.poll() is not None]
    time.sleep(2.0)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    assert [p.wait(timeout=120) for p in procs] == [75, 75], [p.stderr.read()[-2000:] for p in procs]
    p0, p1 = np.load(tmp_path / "worker0_preempted.npz"), np.load(tmp_path / "worker1_preempted.npz")
    stopped = int(p0["steps"])
    assert 0 < stopped < steps and int(p1["steps"]) == stopped
    assert _saved_steps(ckpts)[-1] == stopped and all(s % every == 0 for s in _saved_steps(ckpts)[:-1])
    scratch = worker_scratch_dir(str(tmp_path / "run"), 1)
    assert sorted(os.listdir(scratch)) == ["checkpoint", f"ckpt-{stopped}.data-00000-of-00001", f"ckpt-{stopped}.index"]

    procs = _start_workers(tmp_path, synth_dir, steps, every)
    deadline, killed_after = time.time() + 240, None
    while time.time() < deadline and all(p.poll() is None for p in procs):
        saved = _saved_steps(ckpts)
        if saved and saved[-1] > stopped:
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
    assert newest in (stopped, killed_after)

    _wait(_start_workers(tmp_path, synth_dir, steps, every))
    w0, w1 = np.load(tmp_path / "worker0.npz"), np.load(tmp_path / "worker1.npz")
    resumed = int(w0["start_step"])
    assert resumed == newest
    assert int(w1["start_step"]) == resumed                   # worker 1 restored the chief's checkpoint
    assert int(w0["steps"]) == int(w1["steps"]) == steps
    assert int(w0["replicas"]) == 2 and bool(w0["chief"]) and not bool(w1["chief"])
    for k in w0.files:
        if k.startswith("w"):
            np.testing.assert_array_equal(w0[k], w1[k])
    assert _saved_steps(ckpts)[-1] == steps
    assert not os.path.exists(scratch)                        # removed at the normal end
    # evaluation: the chief's score reached worker 1, and one device gives it from final weights
    from utils.evaluation import evaluate_model
    from utils.predict import load_trained_model

    model, cfg = load_trained_model(str(tmp_path / "run" / "final.weights.h5"))
    alone = evaluate_model(model, cfg)
    assert alone["predicted_people"] > 0 and int(w0["predicted_people"]) == alone["predicted_people"]
    assert float(w0["score"]) == float(w1["score"]) == float(w0["history_score"]) == alone["score"]


def test_a_wrong_val_folder_on_the_chief_stops_every_worker(tmp_path, synth_dir):
    """Across machines (TF_CONFIG) only the chief reads the validation split: its error (exit 2,
    naming the folder) reaches the other worker, which stops too instead of waiting in the next
    collective."""
    procs = _start_workers(tmp_path, synth_dir, 2, 0, mode="worker_bad_val")
    outs = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], [o[-2000:] for o in outs]
    assert str(tmp_path / "not_here") in outs[0].strip().splitlines()[-1]
    assert "another worker failed while checking the input" in outs[1]


# The command of the kill and SIGTERM tests, and the uninterrupted run they are compared with.
def _main_command(run_dir, synth, *extra):
    return [sys.executable, os.path.join(ROOT, "main.py"), "--run-dir", str(run_dir),
            "--synthetic-dir", str(synth), "--synthetic-train-images", "24", "--synthetic-val-images", "4",
            "--input-height", "64", "--input-width", "64", "--batch-size", "2", "--tiny-width", "8",
            "--tiny-stem-channels", "16", "--head-channels", "16", "--sigma", "1.5", "--tau", "2",
            "--epochs", "2", "--steps-per-epoch", "40", "--deterministic", "--steps-per-call", "2",
            "--log-every-steps", "1", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 80 steps of :func:`_main_command` without interruption (2 epochs of 40 steps over 24
    pictures: passes over the data cross the epochs)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.run(_main_command(out / "run", out / "synth"), env=_env(), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _final_weights(run_dir):
    from utils.predict import load_trained_model

    model, _ = load_trained_model(os.path.join(run_dir, "final.weights.h5"))
    return [w for w in model.get_weights()]


def _assert_same_weights(run_a, run_b):
    """Every weight (BatchNorm statistics included) of two runs' final models, to float
    tolerance: the same pictures in the same order with the same augmentation and the same
    optimizer state; a replayed or reshuffled stream moves them by orders of magnitude more."""
    a, b = _final_weights(run_a), _final_weights(run_b)
    assert len(a) == len(b)
    worst = max(float(np.max(np.abs(x - y)) / (float(np.max(np.abs(x))) + 1e-6)) for x, y in zip(a, b))
    assert worst < 1e-4, worst


def test_kill_minus_9_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    cmd = _main_command(run_dir, uninterrupted / "synth", "--checkpoint-every-steps", "5")
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    killed_after = None
    while time.time() < deadline and first.poll() is None:
        steps = _saved_steps(run_dir / "checkpoints")
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
    _assert_same_weights(run_dir, uninterrupted / "run")


def test_sigterm_mid_epoch_saves_that_step_and_the_resumed_run_equals_the_uninterrupted_one(tmp_path, uninterrupted):
    """SIGTERM in the middle of epoch 1, no mid-epoch checkpoint configured: the run saves the
    step it reached and exits with 75 within seconds ("preempted": true); the same command
    resumes there and ends on step 80 with the uninterrupted run's weights."""
    run_dir = tmp_path / "run"
    cmd = _main_command(run_dir, uninterrupted / "synth")
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
        assert _wait_for(log, "Epoch 1/2", [first]), open(log).read()[-2000:]
        time.sleep(3.0)
        signalled = time.time()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 75, open(log).read()[-3000:]
    assert time.time() - signalled < 30
    result = json.loads(open(log).read().strip().splitlines()[-1])
    stopped = result["steps"]
    assert result["preempted"] is True and 0 < stopped < 40 and result["epochs"] == 0
    assert _saved_steps(run_dir / "checkpoints") == [stopped]
    assert not (run_dir / "final.weights.h5").exists()

    second = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["resumed_from"].endswith(f"ckpt-{stopped}") and result["steps"] == 80
    assert result["preempted"] is False
    _assert_same_weights(run_dir, uninterrupted / "run")


def test_sigterm_to_the_process_per_gpu_launcher_saves_every_worker_then_resumes(tmp_path):
    """``distribute_main.py --process-per-gpu`` (two CPU worker processes) signalled as a
    scheduler does (SIGTERM to the launcher and its workers): the chief's console streams live,
    both workers save the same step and the launcher exits with 75; the same command resumes
    and finishes the planned steps."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "distribute_main.py"), "--cpu", "--gpus", "0,1", "--process-per-gpu",
           "--run-dir", str(run_dir), "--synthetic-dir", str(tmp_path / "synth"), "--synthetic-train-images", "8",
           "--synthetic-val-images", "2", "--input-height", "64", "--input-width", "64", "--batch-size", "1",
           "--tiny-width", "8", "--tiny-stem-channels", "16", "--head-channels", "16", "--sigma", "1.5",
           "--tau", "2", "--epochs", "1", "--steps-per-epoch", "120", "--steps-per-call", "2", "--deterministic"]
    log = tmp_path / "launcher.log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
        assert _wait_for(log, "Epoch 1/1", [launcher]), open(log).read()[-3000:]    # live, before any exit
        time.sleep(3.0)
        os.killpg(launcher.pid, signal.SIGTERM)
        assert launcher.wait(timeout=120) == 75, open(log).read()[-3000:]
    text = open(log).read()
    result = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
    stopped = result["steps"]
    assert result["preempted"] is True and 0 < stopped < 120
    assert _saved_steps(run_dir / "checkpoints") == [stopped]
    assert "error: worker process" not in text                 # no worker was killed as a failure
    second = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["resumed_from"].endswith(f"ckpt-{stopped}") and result["steps"] == 120


def _trainable_after(run_dir):
    from utils.predict import load_trained_model

    model, _ = load_trained_model(os.path.join(run_dir, "final.weights.h5"))
    return [v.numpy() for v in model.trainable_variables]


def test_process_per_gpu_trains_to_the_weights_of_mirrored_over_two_logical_cpus(tmp_path):
    """``distribute_main.py --process-per-gpu`` (two worker processes launched by the script,
    each with its own input pipeline; CPU here) and ``--cpu-replicas 2`` (MirroredStrategy in one
    process) train one SGD step from the same weights on the same global batch (2 training
    pictures, one per replica, no augmentation) to the same weights, within the tolerance of
    the replica test (per-variable relative error of the move). Measured here: 4e-6 median,
    3e-5 worst after one step; over three steps the two strategies drift apart (median 6e-3
    at lr 1e-2) although every replica receives the same picture at every step (checked by
    printing each replica's labels), while the two workers' weights stay identical."""
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
        assert summary["steps"] == 1, summary
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
