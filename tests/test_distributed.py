"""Training across processes: two loopback MultiWorkerMirroredStrategy workers preempted, resumed
and refused when they restore different steps; a wrong validation folder on the chief stops
every worker; ``distribute_main.py --process-per-gpu`` against one device on the joined batch. (2 logical CPU
replicas in one process: test_replicas.py; ``kill -9`` of ``main.py``: test_preemption.py.)"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from training_helpers import saved_steps, subprocess_env as _env, wait_for
from utils.distribute import free_local_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(ROOT, "tests", "training_helpers.py")


# what a finished run directory holds (docs/training.md), written by the chief alone
RUN_FILES = sorted(["best.weights.h5", "checkpoints", "config.json", "final.weights.h5", "history.json", "logs",
                    "predictions.png", "resumes.jsonl"])


def _start_workers(out, synth_dir, steps, every, mode="worker", log=None, outs=None):
    """Two loopback workers of ``training_helpers.py MODE``; ``outs``: each worker's own folder
    (default: ``out`` for both, the storage every worker sees)."""
    ports = free_local_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        stdout = open(log, "w") if (log and index == 0) else subprocess.DEVNULL
        folder = outs[index] if outs else out
        procs.append(subprocess.Popen([sys.executable, HELPERS, mode, str(folder), synth_dir, str(steps), str(every)],
                                      env=_env(TF_CONFIG=tf_config), stdout=stdout,
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


def test_two_workers_preempted_resume_together_with_identical_weights(tmp_path, synth_dir):
    """Two loopback workers (MultiWorkerMirroredStrategy). 1: SIGTERM to both, as a scheduler
    preempts: both save the same mid-epoch step, without a mid-epoch checkpoint due, and exit
    with 75; worker 1's checkpoint is in its one scratch folder, not in the run directory. 2: the
    same command resumes both from the chief's checkpoint and finishes on the planned step with
    identical weights on both workers, evaluated once (on the chief) to the score that one device
    gives with the final weights. 3: a worker that cannot see the chief's checkpoints (it
    restores nothing) stops both workers with the cause. (``kill -9`` and resume: tests/test_preemption.py.)"""
    from utils.training import worker_scratch_dir

    steps, every = 12, 0
    ckpts = tmp_path / "run" / "checkpoints"
    log = tmp_path / "chief.log"
    procs = _start_workers(tmp_path, synth_dir, steps, every, log=log)
    assert wait_for(log, "Epoch 1/1", procs), [p.stderr.read()[-2000:] for p in procs if p.poll() is not None]
    time.sleep(2.0)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    assert [p.wait(timeout=120) for p in procs] == [75, 75], [p.stderr.read()[-2000:] for p in procs]
    p0, p1 = np.load(tmp_path / "worker0_preempted.npz"), np.load(tmp_path / "worker1_preempted.npz")
    stopped = int(p0["steps"])
    assert 0 < stopped < steps and int(p1["steps"]) == stopped
    assert saved_steps(ckpts) == [stopped]
    scratch = worker_scratch_dir(str(tmp_path / "run"), 1)
    assert sorted(os.listdir(scratch)) == ["checkpoint", f"ckpt-{stopped}.data-00000-of-00001", f"ckpt-{stopped}.index"]

    # 2: the same command resumes from the step both saved and finishes
    _wait(_start_workers(tmp_path, synth_dir, steps, every))
    w0, w1 = np.load(tmp_path / "worker0.npz"), np.load(tmp_path / "worker1.npz")
    resumed = int(w0["start_step"])
    assert resumed == stopped
    assert int(w1["start_step"]) == resumed                   # worker 1 restored the chief's checkpoint
    assert int(w0["steps"]) == int(w1["steps"]) == steps
    assert int(w0["replicas"]) == 2 and bool(w0["chief"]) and not bool(w1["chief"])
    for k in w0.files:
        if k.startswith("w"):
            np.testing.assert_array_equal(w0[k], w1[k])
    assert saved_steps(ckpts)[-1] == steps
    assert not os.path.exists(scratch)                        # removed at the normal end
    # only the chief wrote into the run directory: one TensorBoard file per run of the chief
    run_dir = tmp_path / "run"
    assert sorted(os.listdir(run_dir)) == RUN_FILES
    assert len(os.listdir(run_dir / "logs")) == 2
    # evaluation: the chief's score reached worker 1, and one device gives it from final weights
    from utils.evaluation import evaluate_model
    from utils.predict import load_trained_model

    model, cfg = load_trained_model(str(tmp_path / "run" / "final.weights.h5"))
    alone = evaluate_model(model, cfg)
    assert alone["predicted_people"] > 0 and int(w0["predicted_people"]) == alone["predicted_people"]
    # the chief's number reached worker 1 exactly; one device's recomputation is another
    # execution path (a joint within float noise of an OKS threshold could move the score)
    assert float(w0["score"]) == float(w1["score"]) == float(w0["history_score"])
    assert float(w0["score"]) == pytest.approx(alone["score"], abs=1e-3)

    # 3: worker 1 on storage the chief's checkpoints are not on (its own empty run directory):
    # it would start from step 0 while the chief resumes at the end; both stop, naming the cause
    procs = _start_workers(tmp_path, synth_dir, steps, every, outs=[tmp_path, tmp_path / "elsewhere"])
    errs = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode != 0 and "the workers restored different steps" in err, err[-2000:]
    assert f"this worker: {steps}" in errs[0] and "this worker: 0" in errs[1]
    assert "run directory must be on storage that all workers see" in errs[1]


def test_a_wrong_val_folder_on_the_chief_stops_every_worker(tmp_path, synth_dir):
    """Across machines (TF_CONFIG) only the chief reads the validation split: its error (exit 2,
    naming the folder) reaches the other worker, which stops too instead of waiting in the next
    collective."""
    procs = _start_workers(tmp_path, synth_dir, 2, 0, mode="worker_bad_val")
    outs = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], [o[-2000:] for o in outs]
    assert str(tmp_path / "not_here") in outs[0].strip().splitlines()[-1]
    assert "another worker failed while checking the input" in outs[1]


def _weights_after(run_dir):
    """(trainable, non-trainable) weights of a run's final model."""
    from utils.predict import load_trained_model

    model, _ = load_trained_model(os.path.join(run_dir, "final.weights.h5"))
    return [v.numpy() for v in model.trainable_variables], [v.numpy() for v in model.non_trainable_variables]


def test_process_per_gpu_trains_to_the_weights_of_one_device_on_the_joined_batch(tmp_path):
    """``distribute_main.py --process-per-gpu`` (two worker processes launched by the script,
    each with its own input pipeline, one picture per worker; CPU here) with ``--sync-batchnorm``
    trains one SGD step from the same weights to the weights of ``main.py`` on one device with
    the two pictures in one batch (no augmentation): the shard each worker reads, the
    all-reduce, the loss normalisation and the synchronised BatchNorm statistics (the moving
    means and variances compared too) against a run with no strategy at all. Measured here
    (per-variable relative error of the move): trainable median 1e-5, worst 9e-5; moving
    statistics median 9e-7, worst 4e-6. The same workers without ``--sync-batchnorm`` (each
    normalising its own picture): median 1.6 and 0.2. A worker reading the other's picture, or a
    gradient counted twice or left out, moves every variable by another gradient."""
    import main
    from training_helpers import random_head_run, relative_moves

    init = tmp_path / "init"
    random_head_run(str(init), joint_heatmaps=True)          # the preset's three heads
    common = ["--synthetic-dir", str(tmp_path / "synth"), "--synthetic-train-images", "2",
              "--synthetic-val-images", "2", "--input-height", "64", "--input-width", "64",
              "--tiny-width", "8", "--tiny-modules", "1,1,1", "--tiny-stem-channels", "16",
              "--head-channels", "16", "--sigma", "1.5", "--tau", "2", "--epochs", "1", "--steps-per-epoch", "1",
              "--no-augment", "--sync-batchnorm",
              "--optimizer", "sgd", "--lr", "1e-2", "--lr-decay-epochs", "", "--lr-schedule", "step",
              "--warmup-steps", "0", "--deterministic",
              "--steps-per-call", "1", "--finetune", str(init / "final.weights.h5"), "--log-every-steps", "1"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "distribute_main.py"), "--run-dir", str(tmp_path / "workers"),
                           *common, "--batch-size", "1", "--cpu", "--gpus", "0,1", "--process-per-gpu"],
                          env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])     # the chief's summary
    assert summary["steps"] == 1, summary
    assert proc.stderr.count("MultiWorkerMirroredStrategy with 2 replicas") == 2, proc.stderr[-3000:]
    # one device, the same two pictures in one batch (main.py's runner, in this process)
    args = main.build_parser("test").parse_args(["--run-dir", str(tmp_path / "one"), *common, "--batch-size", "2"])
    assert main.run_cli(args) == 0
    (before, before_stats), (workers, worker_stats), (one, one_stats) = (
        _weights_after(str(tmp_path / name)) for name in ("init", "workers", "one"))
    moves, stats = relative_moves(before, workers, one), relative_moves(before_stats, worker_stats, one_stats)
    print(f"process-per-gpu vs one device, relative error of the move: trainable median {np.median(moves):.1e}, "
          f"worst {moves.max():.1e}; moving statistics median {np.median(stats):.1e}, worst {stats.max():.1e}")
    assert np.median(moves) < 1e-4 and moves.max() < 2e-3, (np.median(moves), moves.max())
    assert np.median(stats) < 1e-4 and stats.max() < 2e-3, (np.median(stats), stats.max())
