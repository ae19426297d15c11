"""The training loop in one process: learning, NaN handling, resume checks, XLA, loading runs.

Replicas, several workers, kill-and-resume of processes: ``test_distributed.py``."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from training_helpers import FixedPipeline, fixed_batch, no_eval, subprocess_env as _env, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(ROOT, "tests", "training_helpers.py")


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


def test_a_wrong_image_folder_stops_with_one_clear_line(tmp_path, synth_dir, capsys):
    """Every training picture missing (a wrong --train-images): main.py exits with 2 and one line
    naming a file of the folder and the likely cause, not a traceback from inside tf.data."""
    import main

    paths = os.path.join(synth_dir, os.listdir(synth_dir)[0])
    empty = tmp_path / "no_pictures_here"
    empty.mkdir()
    args = main.build_parser("test").parse_args(
        ["--run-dir", str(tmp_path / "run"), "--dataset", "ai_challenger",
         "--train-json", os.path.join(paths, "train.json"), "--train-images", str(empty),
         "--val-json", os.path.join(paths, "val.json"), "--val-images", os.path.join(paths, "val"),
         "--input-height", "64", "--input-width", "64", "--batch-size", "2", "--tiny-width", "8",
         "--tiny-stem-channels", "16", "--head-channels", "16", "--epochs", "1", "--steps-per-epoch", "2"])
    assert main.run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 8 records in a row from") and str(empty) in err
    assert "is the image folder right?" in err and "(8 files): missing file" in err
