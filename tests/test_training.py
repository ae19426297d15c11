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
    images, targets = fixed_batch(cfg, 4)
    trainer = Trainer(cfg, evaluate_fn=no_eval, pipeline=FixedPipeline(images, targets))
    it = iter(trainer.dist_dataset)
    losses = [float(trainer._train_step(next(it))["total"]) for _ in range(20)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
    # the schedule is a function of the optimizer step
    assert int(trainer.optimizer.iterations.numpy()) == 20


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from utils.training import NonFiniteLossError, Trainer

    cfg = tiny_config(str(tmp_path), steps_per_epoch=3, epochs=2)
    images, targets = fixed_batch(cfg, 2)
    good = Trainer(cfg, evaluate_fn=no_eval, pipeline=FixedPipeline(images, targets))
    good.fit()                                       # 2 epochs of 3 steps; then the data turns bad
    saved = sorted(glob.glob(os.path.join(str(tmp_path), "checkpoints", "ckpt-*.index")))
    assert saved and saved[-1].endswith("ckpt-6.index")
    bad_targets = dict(targets, disp=np.full_like(targets["disp"], np.nan))
    cfg3 = cfg.replace(epochs=3)
    bad = Trainer(cfg3, evaluate_fn=no_eval, pipeline=FixedPipeline(images, bad_targets))
    assert bad.resumed_from is not None and int(bad.step.numpy()) == 6
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 7"):
        bad.fit()
    after = sorted(glob.glob(os.path.join(str(tmp_path), "checkpoints", "ckpt-*.index")))
    assert after == saved                            # nothing written from the NaN state


def test_two_logical_cpu_replicas_match_one_device(tmp_path):
    """One step on 2 replicas (synchronized BatchNorm) == one step on 1 device, same global batch."""
    out = subprocess.run([sys.executable, HELPERS, "replicas", str(tmp_path)], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = np.load(tmp_path / "replicas.npz")
    assert int(r["replicas"]) == 2
    np.testing.assert_allclose(float(r["loss_two"]), float(r["loss_one"]), rtol=1e-5)
    n = len([k for k in r.files if k.startswith("one_")])
    moved = 0
    for i in range(n):
        np.testing.assert_allclose(r[f"two_{i}"], r[f"one_{i}"], rtol=1e-5, atol=1e-5)
        moved += not np.allclose(r[f"one_{i}"], r[f"before_{i}"])
    assert moved > n // 2          # the step really changed the weights (incl. BN statistics)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_workers_on_loopback_finish_with_identical_weights(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen([sys.executable, HELPERS, "worker", str(tmp_path)],
                                      env=_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    w0, w1 = np.load(tmp_path / "worker0.npz"), np.load(tmp_path / "worker1.npz")
    assert int(w0["steps"]) == int(w1["steps"]) == 2
    assert int(w0["replicas"]) == 2 and bool(w0["chief"]) and not bool(w1["chief"])
    for k in w0.files:
        if k.startswith("w"):
            np.testing.assert_array_equal(w0[k], w1[k])
    # only the chief wrote the run directory's checkpoints
    assert glob.glob(str(tmp_path / "run" / "checkpoints" / "ckpt-2.index"))


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
    assert first.returncode == -signal.SIGKILL

    second = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    resumed_step = int(result["resumed_from"].rsplit("-", 1)[1])
    assert killed_after <= resumed_step < 80 and resumed_step % 5 == 0
    assert f"resumed from" in second.stderr and f"step {resumed_step}" in second.stderr
    assert result["steps"] == 80 and result["epochs"] == 2     # same schedule, not restarted
    # the optimizer state came back with the step: its iteration counter equals the global step
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints"))
    names = {n for n, _ in tf.train.list_variables(str(run_dir / "checkpoints"))}
    step_key = next(n for n in names if n.startswith("step/"))
    iter_key = next(n for n in names if n.startswith("optimizer/") and "iteration" in n)
    assert reader.get_tensor(step_key) == 80 and reader.get_tensor(iter_key) == 80
