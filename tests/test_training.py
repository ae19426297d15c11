"""The training loop: learning, NaN handling, replicas, multi-worker, kill-and-resume."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from training_helpers import FixedPipeline, fixed_batch, no_eval, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(ROOT, "tests", "training_helpers.py")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "CUDA_VISIBLE_DEVICES")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT, **extra)
    return env


def test_loss_falls_over_20_steps_on_a_fixed_batch(tmp_path):
    from utils.training import Trainer

    cfg = tiny_config(str(tmp_path), batch_size=4, steps_per_epoch=20, epochs=1, lr=3e-3)
    images, labels = fixed_batch(cfg, 4)
    trainer = Trainer(cfg, evaluate_fn=no_eval, pipeline=FixedPipeline(images, labels))
    it = iter(trainer.dist_dataset)
    losses = [trainer.run_steps(it, 1)["total"] for _ in range(20)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
    # the schedule is a function of the optimizer step
    assert int(trainer.optimizer.iterations.numpy()) == 20


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from utils.training import NonFiniteLossError, Trainer

    cfg = tiny_config(str(tmp_path), steps_per_epoch=3, epochs=2)
    images, labels = fixed_batch(cfg, 2)
    good = Trainer(cfg, evaluate_fn=no_eval, pipeline=FixedPipeline(images, labels))
    good.fit()                                       # 2 epochs of 3 steps; then the data turns bad
    saved = sorted(glob.glob(os.path.join(str(tmp_path), "checkpoints", "ckpt-*.index")))
    assert saved and saved[-1].endswith("ckpt-6.index")
    bad_images = np.full(images.shape, np.nan, np.float32)
    cfg3 = cfg.replace(epochs=3)
    bad = Trainer(cfg3, evaluate_fn=no_eval, pipeline=FixedPipeline(bad_images, labels))
    assert bad.resumed_from is not None and int(bad.step.numpy()) == 6
    with pytest.raises(NonFiniteLossError, match="non-finite loss or update at step 7"):
        bad.fit()
    after = sorted(glob.glob(os.path.join(str(tmp_path), "checkpoints", "ckpt-*.index")))
    assert after == saved                            # nothing written from the NaN state


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    """A small synthetic set made once (8 training, 4 validation images) for the evaluator."""
    from dataset.synthetic import ensure_synthetic_dataset
    from training_helpers import synthetic_config

    path = str(tmp_path_factory.mktemp("synth"))
    ensure_synthetic_dataset(synthetic_config("", path))
    return path


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


def test_nan_update_stops_with_exit_code_3_and_the_newest_checkpoint_is_finite(tmp_path, synth_dir, monkeypatch,
                                                                                capsys):
    """A non-finite gradient at step 5 (the loss is finite): main.py's runner exits with 3
    naming the step, and the newest checkpoint (step 4) loads and holds finite weights."""
    import main
    import utils.training
    from training_helpers import nan_at

    class InjectingTrainer(utils.training.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, gradient_hook=nan_at(5), **kwargs)

    monkeypatch.setattr(utils.training, "Trainer", InjectingTrainer)
    run_dir = tmp_path / "run"
    args = main.build_parser("test").parse_args(
        ["--run-dir", str(run_dir), "--synthetic-dir", synth_dir, "--synthetic-train-images", "8",
         "--synthetic-val-images", "4", "--input-height", "64", "--input-width", "64", "--batch-size", "2",
         "--tiny-width", "8", "--tiny-stem-channels", "16", "--head-channels", "16", "--sigma", "1.5",
         "--tau", "2", "--epochs", "3", "--steps-per-epoch", "4", "--steps-per-call", "3",
         "--checkpoint-every-steps", "2"])
    assert main.run_cli(args) == 3
    assert "non-finite loss or update at step 5" in capsys.readouterr().err
    import tensorflow as tf
    from utils.predict import load_trained_model

    latest = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    assert latest.endswith("ckpt-4")
    model, _ = load_trained_model(latest)
    assert all(np.isfinite(w).all() for w in model.get_weights())


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _newest_step(ckpt_dir) -> int:
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(ckpt_dir))
    return int(latest.rsplit("-", 1)[1])


def _start_workers(out, synth_dir, steps, every):
    ports = _free_ports(2)
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
    assert f"resumed from" in second.stderr and f"step {resumed_step}" in second.stderr
    assert result["steps"] == 80 and result["epochs"] == 2     # same schedule, not restarted
    # the optimizer state came back with the step: its iteration counter equals the global step
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints"))
    names = {n for n, _ in tf.train.list_variables(str(run_dir / "checkpoints"))}
    step_key = next(n for n in names if n.startswith("step/"))
    iter_key = next(n for n in names if n.startswith("optimizer/") and "iteration" in n)
    assert reader.get_tensor(step_key) == 80 and reader.get_tensor(iter_key) == 80


def _cli(synth_dir, run_dir, *extra):
    return ["--run-dir", str(run_dir), "--synthetic-dir", synth_dir, "--synthetic-train-images", "8",
            "--synthetic-val-images", "4", "--input-height", "64", "--input-width", "64", "--batch-size", "2",
            "--tiny-width", "8", "--tiny-stem-channels", "16", "--head-channels", "16", "--sigma", "1.5",
            "--tau", "2", "--epochs", "1", "--steps-per-epoch", "2", *extra]


def test_resume_with_another_replica_count_is_refused_naming_both(tmp_path, synth_dir):
    """The step-based schedule depends on the global batch: a run trained on 1 device does not
    resume on 2 replicas; the message names both and the checkpoint stays as it was."""
    run_dir = tmp_path / "run"
    first = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *_cli(synth_dir, run_dir)],
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = sorted(os.listdir(run_dir / "checkpoints"))
    second = subprocess.run([sys.executable, os.path.join(ROOT, "distribute_main.py"), "--cpu-replicas", "2",
                             *_cli(synth_dir, run_dir, "--epochs", "2")],
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    assert "1 replica(s) x batch 2 per replica" in second.stderr
    assert "this run has 2 replica(s) x batch 2 (global batch 4)" in second.stderr
    assert sorted(os.listdir(run_dir / "checkpoints")) == saved


def test_a_run_loads_without_its_backbone_weights_file(tmp_path, synth_dir):
    """--backbone-weights is read once, when the run starts; model_val.py and export.py work
    on the run after that file is gone."""
    from nets.hrnet import backbone_spec, build_hrnet
    from nets.spm_model import get_backbone
    from nets.weights import save_layer_weights
    from training_helpers import synthetic_config
    from utils.training import Trainer

    cfg = synthetic_config(str(tmp_path / "run"), synth_dir)
    trunk = build_hrnet(backbone_spec(cfg.model), (64, 64, 3))
    backbone = str(tmp_path / "backbone.weights.h5")
    save_layer_weights(trunk, backbone)
    images, labels = fixed_batch(cfg, 2)
    trainer = Trainer(cfg.replace(backbone_weights=backbone), evaluate_fn=no_eval,
                      pipeline=FixedPipeline(images, labels))
    np.testing.assert_array_equal(np.asarray(get_backbone(trainer.model).get_layer("conv1").kernel),
                                  np.asarray(trunk.get_layer("conv1").kernel))
    trainer.fit()
    os.remove(backbone)
    from dataset.synthetic import ensure_synthetic_dataset

    paths = ensure_synthetic_dataset(cfg)
    val = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "model_val.py"), "--ckpt", cfg.train.run_dir,
                          "--json", paths.val_json, "--images", paths.val_images, "--out", str(tmp_path / "p.json")],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert val.returncode == 0, val.stderr[-3000:]
    assert json.loads(val.stdout.strip().splitlines()[-1])["predicted_images"] == 4
    export = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export.py"), "--ckpt", cfg.train.run_dir,
                             "--out", str(tmp_path / "exported"), "--no-tflite"],
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    assert os.path.exists(tmp_path / "exported" / "saved_model" / "saved_model.pb")


def test_xla_step_with_clipping_matches_the_plain_step(tmp_path):
    """--xla compiles the replica step (finite flag, clipping, optimizer) and gives the plain
    step's update; a non-finite gradient under --xla still stops naming the step."""
    from training_helpers import nan_at, randomise_output_kernels
    from utils.training import NonFiniteLossError, Trainer

    moves = {}
    for xla in (False, True):
        cfg = tiny_config(str(tmp_path / f"xla{xla}"), batch_size=2, optimizer="sgd", lr=1e-2, xla=xla,
                          grad_clip_norm=1.0, steps_per_call=1)
        images, labels = fixed_batch(cfg, 2)
        trainer = Trainer(cfg, evaluate_fn=no_eval, pipeline=FixedPipeline(images, labels),
                          gradient_hook=nan_at(2))
        if not moves:
            randomise_output_kernels(trainer.model)      # zero output kernels would stop the gradient
            weights = trainer.model.get_weights()
        trainer.model.set_weights(weights)
        it = iter(trainer.dist_dataset)
        trainer.run_steps(it, 1)
        moves[xla] = [a - b for a, b in zip(trainer.model.get_weights(), weights)]
        with pytest.raises(NonFiniteLossError, match="step 2"):
            trainer.run_steps(it, 1)
    # per variable, the relative error of the move (XLA sums in another order: elements near zero
    # differ by a few percent, whole variables by well under 1%; a missing clip or a wrong
    # normalisation would be off by far more)
    errors = [np.linalg.norm(c - p) / np.linalg.norm(p) for p, c in zip(moves[False], moves[True])
              if np.linalg.norm(p) > 0]
    assert len(errors) > len(moves[False]) // 2
    assert np.median(errors) < 1e-2 and max(errors) < 0.1, (np.median(errors), max(errors))


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
    random_head_run(str(init))
    common = ["--synthetic-dir", str(tmp_path / "synth"), "--synthetic-train-images", "2",
              "--synthetic-val-images", "2", "--input-height", "64", "--input-width", "64",
              "--batch-size", "1", "--tiny-width", "8", "--tiny-stem-channels", "16", "--head-channels", "16",
              "--sigma", "1.5", "--tau", "2", "--epochs", "1", "--steps-per-epoch", "3", "--no-augment",
              "--optimizer", "sgd", "--lr", "1e-2", "--lr-decay-epochs", "", "--deterministic",
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
