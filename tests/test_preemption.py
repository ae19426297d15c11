"""Long runs on the user's path: SIGTERM and ``kill -9`` of ``main.py`` mid-epoch, then the same
command, against an uninterrupted run (the data position, the optimizer, the schedule); SIGTERM
to the ``--process-per-gpu`` launcher while its workers start. The loopback-worker version is in
test_distributed.py."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from training_helpers import newest_step, saved_steps, subprocess_env as _env, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The command of the kill and SIGTERM tests, and the uninterrupted run they are compared with.
def _main_command(run_dir, synth, *extra):
    return [sys.executable, os.path.join(ROOT, "main.py"), "--run-dir", str(run_dir),
            "--synthetic-dir", str(synth), "--synthetic-train-images", "24", "--synthetic-val-images", "4",
            "--input-height", "64", "--input-width", "64", "--batch-size", "2", "--tiny-width", "8",
            "--tiny-modules", "1,1,1", "--tiny-stem-channels", "16", "--head-channels", "16", "--sigma", "1.5", "--tau", "2",
            "--epochs", "2", "--steps-per-epoch", "40", "--deterministic", "--steps-per-call", "2",
            "--log-every-steps", "1", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 80 steps of :func:`_main_command` without interruption (2 epochs of 40 steps over 24
    pictures: passes over the data cross the epochs)."""
    import main

    out = tmp_path_factory.mktemp("uninterrupted")
    argv = _main_command(out / "run", out / "synth")[2:]           # main.py's runner, in this process
    assert main.run_cli(main.build_parser("test").parse_args(argv)) == 0
    return out


def _wait_for_training(run_dir, proc, timeout=240):
    """Until the first call's losses reached TensorBoard (--log-every-steps 1): the steps run."""
    deadline = time.time() + timeout
    first_size = None
    while time.time() < deadline and proc.poll() is None:
        events = glob.glob(str(run_dir / "logs" / "events.out.tfevents.*"))
        if events:
            size = os.path.getsize(events[0])
            first_size = size if first_size is None else first_size
            if size > first_size:
                return
        time.sleep(0.1)
    raise AssertionError("the run did not start training")


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


def test_sigterm_then_kill_minus_9_then_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    """1: SIGTERM in the middle of epoch 1, no mid-epoch checkpoint configured: the run saves the
    step it reached and exits with 75 within seconds ("preempted": true). 2: the same command
    (with checkpoints every 5 steps), SIGTERM during its start-up: it stops before its first step
    with 75, nothing trained or saved. 3: the same command resumes there; ``kill -9`` after a
    later mid-epoch checkpoint. 4: the same command resumes from the newest complete checkpoint
    and ends on step 80 with the uninterrupted run's weights, the optimizer's step equal to the
    run's."""
    run_dir = tmp_path / "run"
    cmd = _main_command(run_dir, uninterrupted / "synth")
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
        assert wait_for(log, "Epoch 1/2", [first]), open(log).read()[-2000:]
        _wait_for_training(run_dir, first)
        signalled = time.time()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 75, open(log).read()[-3000:]
    assert time.time() - signalled < 20          # one call of 2 steps and a checkpoint
    result = json.loads(open(log).read().strip().splitlines()[-1])
    stopped = result["steps"]
    assert result["preempted"] is True and 0 < stopped < 40 and result["epochs"] == 0
    assert saved_steps(run_dir / "checkpoints") == [stopped]
    assert not (run_dir / "final.weights.h5").exists()

    cmd = _main_command(run_dir, uninterrupted / "synth", "--checkpoint-every-steps", "5")
    log = tmp_path / "start-up.log"
    with open(log, "w") as out:
        starting = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
        # logged while the run directory's config is checked, before the model is built
        assert wait_for(log, "resume: checkpoint_every_steps changed", [starting]), open(log).read()[-2000:]
        starting.send_signal(signal.SIGTERM)
        assert starting.wait(timeout=120) == 75, open(log).read()[-3000:]
    text = open(log).read()
    assert "SIGTERM during start-up" in text and "Epoch 1/2" not in text and "Traceback" not in text
    assert json.loads(text.strip().splitlines()[-1])["steps"] == stopped
    assert saved_steps(run_dir / "checkpoints") == [stopped]

    second = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed_after = time.time() + 240, None
    while time.time() < deadline and second.poll() is None:
        steps = saved_steps(run_dir / "checkpoints")
        if steps and steps[-1] > stopped and steps[-1] < 40:
            second.send_signal(signal.SIGKILL)
            killed_after = steps[-1]
            break
        time.sleep(0.1)
    second.wait(timeout=30)
    assert killed_after is not None and second.returncode == -signal.SIGKILL, "no mid-epoch checkpoint reached"
    newest = newest_step(run_dir / "checkpoints")          # complete and registered at the kill
    assert newest in (stopped, killed_after) or killed_after - 5 <= newest <= killed_after

    third = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-3000:]
    result = json.loads(third.stdout.strip().splitlines()[-1])
    assert result["resumed_from"].endswith(f"ckpt-{newest}") and f"step {newest}" in third.stderr
    assert result["steps"] == 80 and result["epochs"] == 2 and result["preempted"] is False
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints"))
    names = {n for n, _ in tf.train.list_variables(str(run_dir / "checkpoints"))}
    step_key = next(n for n in names if n.startswith("step/"))
    iter_key = next(n for n in names if n.startswith("optimizer/") and "iteration" in n)
    assert reader.get_tensor(step_key) == 80 and reader.get_tensor(iter_key) == 80
    _assert_same_weights(run_dir, uninterrupted / "run")


def test_sigterm_to_the_process_per_gpu_launcher_during_start_up_stops_both_workers_with_75(tmp_path):
    """``distribute_main.py --process-per-gpu`` (two CPU worker processes) signalled as a
    scheduler does (SIGTERM to the launcher and its workers, the launcher forwarding it: two
    deliveries each) while the workers start: both stop before their first step with nothing
    saved and exit with 75, and so does the launcher (before, the signal killed them and the
    launcher reported a failed worker). Signals during training: the loopback workers of
    test_distributed.py, and the launcher's forwarding with stand-in workers in test_devices.py."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "distribute_main.py"), "--cpu", "--gpus", "0,1", "--process-per-gpu",
           "--run-dir", str(run_dir), "--synthetic-dir", str(tmp_path / "synth"), "--synthetic-train-images", "8",
           "--synthetic-val-images", "2", "--input-height", "64", "--input-width", "64", "--batch-size", "1",
           "--tiny-width", "8", "--tiny-modules", "1,1,1", "--tiny-stem-channels", "16", "--head-channels", "16",
           "--sigma", "1.5", "--tau", "2", "--epochs", "1", "--steps-per-epoch", "120", "--steps-per-call", "2",
           "--deterministic"]
    log = tmp_path / "launcher.log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
        # both workers have made their strategy (TensorFlow loaded) and are building the trainer
        assert wait_for(log, "MultiWorkerMirroredStrategy with 2 replicas", [launcher], count=2), \
            open(log).read()[-3000:]
        os.killpg(launcher.pid, signal.SIGTERM)
        assert launcher.wait(timeout=120) == 75, open(log).read()[-3000:]
    text = open(log).read()
    assert text.count("MultiWorkerMirroredStrategy with 2 replicas") == 2, text[-3000:]
    assert "SIGTERM during start-up" in text and "Epoch 1/1" not in text
    assert "error: worker process" not in text and "Traceback" not in text
    result = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])    # the chief's
    assert result["preempted"] is True and result["steps"] == 0
    assert saved_steps(run_dir / "checkpoints") == []
