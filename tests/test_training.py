"""The training loop in one process: learning, NaN handling, resume checks, XLA, loading runs.

Replicas: ``test_replicas.py``; several workers: ``test_distributed.py``; kill and resume: ``test_preemption.py``."""

import dataclasses
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from training_helpers import FixedPipeline, fixed_batch, no_eval, run_tool, subprocess_env as _env, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(ROOT, "tests", "training_helpers.py")


def test_loss_falls_over_20_steps_on_a_fixed_batch(tmp_path):
    from utils.training import Trainer

    cfg = tiny_config(str(tmp_path), batch_size=4, steps_per_epoch=20, epochs=1, lr=3e-3, optimizer="adam",
                      deterministic=True, seed=0)      # the trunk's initial weights seeded
    images, labels = fixed_batch(cfg, 4)
    trainer = Trainer(cfg, evaluate_fn=no_eval, pipeline=FixedPipeline(images, labels))
    it = iter(trainer.dist_dataset)
    losses = [trainer.run_steps(it, 1)["total"] for _ in range(20)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
    # the schedule is a function of the optimizer step
    assert int(trainer.optimizer.iterations.numpy()) == 20


def _state(trainer):
    """Every number a step may change: weights (BatchNorm statistics included), optimizer slots
    and iteration count."""
    return ([v.numpy().copy() for v in trainer.model.weights],
            [v.numpy().copy() for v in trainer.optimizer.variables])


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_non_finite_steps_are_skipped_counted_and_leave_everything_untouched(tmp_path, precision):
    """Non-finite gradients injected at steps 3 and 5, in float32 and under float16 loss scaling:
    each update is skipped (weights, BatchNorm statistics, Adam's moments and its iteration
    count exactly as before the step; float16: the loss scale halved and its growth count restarted), counted in
    the result and history.json, and the run finishes."""
    from training_helpers import nan_at
    from utils.training import Trainer

    cfg = tiny_config(str(tmp_path), steps_per_epoch=6, epochs=1, steps_per_call=1, optimizer="adam",
                      mixed_precision="" if precision == "float32" else precision)
    images, labels = fixed_batch(cfg, 2)
    trainer = Trainer(cfg, evaluate_fn=no_eval, pipeline=FixedPipeline(images, labels), gradient_hook=nan_at(3, 5))
    scale = getattr(trainer.optimizer, "dynamic_scale", None)
    it = iter(trainer.dist_dataset)
    trainer.run_steps(it, 2)
    weights, slots = _state(trainer)
    scale_before = float(scale.numpy()) if scale is not None else None
    third = trainer.run_steps(it, 1)
    assert third["skipped"] == [3]
    after_weights, after_slots = _state(trainer)
    if scale is not None:
        # the loss scale halves and its count of good steps restarts; the inner optimizer's
        # slots and iteration are compared below
        assert float(scale.numpy()) == scale_before / 2
        inner = {id(v) for v in trainer.optimizer.inner_optimizer.variables}
        kept = [i for i, v in enumerate(trainer.optimizer.variables) if id(v) in inner]
        assert 0 < len(kept) < len(trainer.optimizer.variables)
        slots, after_slots = ([state[i] for i in kept] for state in (slots, after_slots))
    for a, b in zip(weights + slots, after_weights + after_slots):
        np.testing.assert_array_equal(a, b)
    assert int(trainer.optimizer.iterations.numpy()) == 2 and int(trainer.step.numpy()) == 3
    trainer.run_steps(it, 1)                              # step 4 trains
    assert any(not np.array_equal(a, b) for a, b in zip(weights, _state(trainer)[0]))
    del it
    result = trainer.fit()                                # steps 5 (skipped) and 6
    assert result["steps"] == 6 and result["skipped_updates"] == 1
    history = json.load(open(tmp_path / "history.json"))
    assert history[-1]["skipped_updates"] == 1
    assert all(np.isfinite(w).all() for w in trainer.model.get_weights())


class _TurnsNaN(FixedPipeline):
    """The fixed batch for ``good`` steps, then NaN pictures (as a corrupt shard would give)."""

    good = 6

    def dataset(self, batch_size=None, input_context=None, repeat=False, start_step=0, seed=None):
        import tensorflow as tf

        images = self.images.astype(np.float32)
        return tf.data.Dataset.from_tensors((images, self.labels)).repeat(self.good).concatenate(
            tf.data.Dataset.from_tensors((np.full_like(images, np.nan), self.labels)).repeat())


def test_consecutive_non_finite_steps_exit_with_code_3_naming_them(tmp_path, synth_dir, monkeypatch, capsys):
    """Pictures that turn NaN after two good epochs, through main.py's runner: every step is
    skipped; the third in a row (--max-bad-steps 3) stops the run with exit code 3 naming steps 7
    to 9; the weights (BatchNorm's statistics too, which saw the NaN pictures) are those of step 6,
    whose checkpoint loads with finite weights, and nothing is written from that state."""
    import main
    import tensorflow as tf
    import utils.training
    from utils.predict import load_trained_model

    trainers = []

    class TurningNaN(utils.training.Trainer):
        def __init__(self, cfg, *args, **kwargs):
            images, labels = fixed_batch(cfg, cfg.data.batch_size)
            super().__init__(cfg, *args, pipeline=_TurnsNaN(images, labels), **kwargs)
            trainers.append(self)

    monkeypatch.setattr(utils.training, "Trainer", TurningNaN)
    run_dir = tmp_path / "run"
    args = main.build_parser("test").parse_args(
        ["--run-dir", str(run_dir), "--synthetic-dir", synth_dir, "--synthetic-train-images", "8",
         "--synthetic-val-images", "4", "--input-height", "64", "--input-width", "64", "--batch-size", "2",
         "--tiny-width", "8", "--tiny-modules", "1,1,1", "--tiny-stem-channels", "16", "--head-channels", "16",
         "--sigma", "1.5", "--tau", "2", "--epochs", "3", "--steps-per-epoch", "3", "--steps-per-call", "1",
         "--max-bad-steps", "3", "--eval-every-epochs", "3"])      # no evaluation before the stop
    assert main.run_cli(args) == 3
    assert "3 consecutive non-finite steps, 7 to 9" in capsys.readouterr().err
    saved = sorted(glob.glob(str(run_dir / "checkpoints" / "ckpt-*.index")))
    assert [os.path.basename(f) for f in saved] == ["ckpt-3.index", "ckpt-6.index"]
    assert tf.train.latest_checkpoint(str(run_dir / "checkpoints")).endswith("ckpt-6")
    at_six, _ = load_trained_model(saved[-1][:-len(".index")])
    assert all(np.isfinite(w).all() for w in at_six.get_weights())
    trainer, = trainers
    for a, b in zip(at_six.get_weights(), trainer.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(trainer.optimizer.iterations.numpy()) == 6 and not (run_dir / "final.weights.h5").exists()


def _cli(synth_dir, run_dir, *extra):
    return ["--run-dir", str(run_dir), "--synthetic-dir", synth_dir, "--synthetic-train-images", "8",
            "--synthetic-val-images", "4", "--input-height", "64", "--input-width", "64", "--batch-size", "2",
            "--tiny-width", "8", "--tiny-modules", "1,1,1", "--tiny-stem-channels", "16", "--head-channels", "16",
            "--sigma", "1.5", "--tau", "2", "--epochs", "1", "--steps-per-epoch", "2", *extra]


def test_resume_keeps_the_global_batch_not_the_replica_layout(tmp_path, synth_dir, capsys):
    """A run of 1 replica x batch 4 resumes on 2 logical CPU replicas x batch 2 (the same global
    batch: epoch, schedule and data position continue; a warning says what changes; TensorFlow's
    graph optimiser on, as users run), and is
    refused with another global batch (1 x 8) naming both and the batch that fits, the
    checkpoints left as they were."""
    import main

    run_dir = tmp_path / "run"
    parse = main.build_parser("test").parse_args
    assert main.run_cli(parse(_cli(synth_dir, run_dir, "--batch-size", "4", "--lr-schedule", "cosine"))) == 0
    capsys.readouterr()
    wider = parse(_cli(synth_dir, run_dir, "--batch-size", "8", "--lr-schedule", "cosine", "--epochs", "2"))
    assert main.run_cli(wider) == 2
    err = capsys.readouterr().err
    assert "a global batch of 4 (1 replica(s) x batch 4)" in err
    assert "this run has 8 (1 replica(s) x batch 8)" in err and "--batch-size 4" in err
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index"]
    script = os.path.join(ROOT, "distribute_main.py")
    # TensorFlow's graph optimiser on in this run, as users run (the other test processes leave it
    # off for time: tests/site/sitecustomize.py)
    split = subprocess.run([sys.executable, script, "--cpu-replicas", "2",
                            *_cli(synth_dir, run_dir, "--batch-size", "2", "--lr-schedule", "cosine", "--epochs", "2")],
                           env=_env(SPM_TEST_GRAPPLER="on"), capture_output=True, text=True, timeout=300)
    assert split.returncode == 0, split.stderr[-3000:]
    result = json.loads(split.stdout.strip().splitlines()[-1])
    assert result["resumed_from"].endswith("ckpt-2") and result["steps"] == 4 and result["epochs"] == 2
    assert "2 replica(s) x batch 2 instead of 1 x 4" in split.stderr
    # the schedule continued: the optimizer's step is the run's (cosine over the 4 steps of 2 epochs)
    import tensorflow as tf

    names = {n for n, _ in tf.train.list_variables(str(run_dir / "checkpoints"))}
    iterations = next(n for n in names if n.startswith("optimizer/") and "iteration" in n)
    assert tf.train.load_checkpoint(str(run_dir / "checkpoints")).get_tensor(iterations) == 4
    resumes = [json.loads(line) for line in open(run_dir / "resumes.jsonl")]
    assert resumes[-1]["step"] == 2 and resumes[-1]["replicas"] == 2 and resumes[-1]["changed"]["epochs"] == [1, 2]


def test_resume_refuses_a_field_that_changes_the_checkpoint_naming_both_values(tmp_path):
    """Fields that change what the checkpoint means (SPR targets, the network, its skeleton and
    input size, the losses) are refused with both values, before anything is written; epochs and
    logging may change. The resumed run keeps the best score of the evaluation that followed the
    checkpoint (the epoch-end checkpoint precedes it). A checkpoint is not saved from non-finite
    weights."""
    from utils.training import Trainer

    cfg = tiny_config(str(tmp_path), steps_per_epoch=1, epochs=1)
    images, labels = fixed_batch(cfg, 2)
    first = Trainer(cfg, evaluate_fn=lambda model, cfg: {"score": 0.25}, pipeline=FixedPipeline(images, labels))
    assert first.fit()["best_score"] == 0.25
    written = (tmp_path / "config.json").read_text()
    for change, message in [
            (dict(anchor="root"), "anchor: 'parent' in the run, 'root' now"),
            (dict(sigma=3.0), "sigma: 1.5 in the run, 3.0 now"),
            (dict(head_channels=8, root_loss="l2"),
             "head_channels: 16 in the run, 8 now; root_loss: 'focal' in the run, 'l2' now"),
            (dict(backbone="hrnet_w18"), "backbone: 'hrnet_tiny' in the run, 'hrnet_w18' now"),
            (dict(dataset="coco", skeleton="coco"), "skeleton: 'ai_challenger' in the run, 'coco' now"),
            (dict(input_height=96), "input_height: 64 in the run, 96 now")]:
        with pytest.raises(ValueError) as refused:
            Trainer(cfg.replace(epochs=2, **change), evaluate_fn=no_eval, pipeline=FixedPipeline(images, labels))
        assert message in str(refused.value) and "--config" in str(refused.value)
        assert (tmp_path / "config.json").read_text() == written
    resumed = Trainer(cfg.replace(epochs=2, log_every_steps=5, score_threshold=0.3), evaluate_fn=no_eval,
                      pipeline=FixedPipeline(images, labels))
    assert {name for name, _, _ in resumed.config_changes} == {"epochs", "log_every_steps", "score_threshold"}
    # the checkpoint holds the best score from before its epoch's evaluation; history.json the 0.25
    assert float(resumed.best_score.numpy()) == 0.25
    assert json.loads((tmp_path / "config.json").read_text())["train"]["epochs"] == 2
    # a checkpoint is never written from non-finite weights: the last good one stays the newest
    import tensorflow as tf

    from utils.training import NonFiniteLossError

    listing = sorted(os.listdir(tmp_path / "checkpoints"))
    kernel = resumed.model.get_layer("head.root.out").kernel
    kernel.assign(tf.fill(kernel.shape, float("nan")))
    with pytest.raises(NonFiniteLossError) as bad:
        resumed.save_checkpoint()
    assert str(bad.value) == (f"non-finite weights at step 1; not saved, the last good checkpoint is kept in "
                              f"{tmp_path / 'checkpoints'}")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == listing


def test_a_run_loads_without_its_backbone_weights_file(tmp_path, synth_dir):
    """--backbone-weights is read once, when the run starts; model_val.py works on the run after
    that file is gone, and the loader it shares with export.py and spm_model_test.py gives the
    run's trained weights. (export.py on a run directory: test_export.py.)"""
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
    val = run_tool("model_val", "--ckpt", cfg.train.run_dir, "--json", paths.val_json, "--images", paths.val_images,
                   "--out", tmp_path / "p.json")
    assert val.returncode == 0, val.stderr[-3000:]
    assert json.loads(val.stdout.strip().splitlines()[-1])["predicted_images"] == 4
    # the tools' loader (model_val.py's, export.py's, spm_model_test.py's) gives the run's trained
    # weights, not the backbone file's
    from utils.predict import load_trained_model

    model, _ = load_trained_model(cfg.train.run_dir)
    trained = np.asarray(get_backbone(trainer.model).get_layer("conv1").kernel)
    assert not np.array_equal(trained, np.asarray(trunk.get_layer("conv1").kernel))
    np.testing.assert_array_equal(np.asarray(get_backbone(model).get_layer("conv1").kernel), trained)


def test_xla_step_with_clipping_matches_the_plain_step(tmp_path):
    """--xla compiles the replica step (all-reduces, finite flag, clipping) and gives the plain
    step's update, both clipped (the move's norm is lr x the limit); a non-finite gradient under
    --xla is skipped like the plain step's."""
    from training_helpers import nan_at, randomise_output_kernels
    from utils.training import Trainer

    moves = {}
    for xla in (False, True):
        cfg = tiny_config(str(tmp_path / f"xla{xla}"), batch_size=2, optimizer="sgd", lr=1e-2, xla=xla,
                          grad_clip_norm=1.0, steps_per_call=1, deterministic=True, seed=0)
        images, labels = fixed_batch(cfg, 2)
        trainer = Trainer(cfg, evaluate_fn=no_eval, pipeline=FixedPipeline(images, labels),
                          gradient_hook=nan_at(2))
        if not moves:
            randomise_output_kernels(trainer.model)      # zero output kernels would stop the gradient
            weights = trainer.model.get_weights()
        trainer.model.set_weights(weights)
        it = iter(trainer.dist_dataset)
        trainable = [v.numpy() for v in trainer.model.trainable_variables]
        trainer.run_steps(it, 1)
        # the clip is active: SGD's step moves the trainable weights by lr x the limit
        assert np.sqrt(sum(np.sum((v.numpy().astype(np.float64) - b) ** 2) for v, b in
                           zip(trainer.model.trainable_variables, trainable))) == pytest.approx(1e-2, rel=1e-3)
        moves[xla] = [a - b for a, b in zip(trainer.model.get_weights(), weights)]
        moved = trainer.model.get_weights()
        assert trainer.run_steps(it, 1)["skipped"] == [2]
        assert all(np.array_equal(a, b) for a, b in zip(moved, trainer.model.get_weights()))
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
    assert err.startswith("error: the train split's first 8 pictures cannot be used") and str(empty) in err
    assert "missing file" in err and "(--train-images)" in err
    assert not (tmp_path / "run" / "checkpoints").exists()             # before the first step


def test_lr_base_batch_scales_the_rate_linearly_with_the_global_batch():
    from utils.training import build_optimizer, learning_rate

    cfg = tiny_config("", lr=1e-3, lr_base_batch=8)
    assert learning_rate(cfg, 32) == pytest.approx(4e-3) and learning_rate(cfg, 4) == pytest.approx(5e-4)
    assert learning_rate(cfg.replace(lr_base_batch=0), 32) == pytest.approx(1e-3)      # off: as given
    opt = build_optimizer(cfg, steps_per_epoch=10, global_batch=16)
    assert float(opt.learning_rate) == pytest.approx(2e-3)


def test_weights_are_written_atomically(tmp_path):
    """A failure in the middle of writing leaves the previous best.weights.h5 whole (and no
    temporary file behind)."""
    from nets.spm_model import build_spm_model
    from utils.training import save_weights_atomically

    model = build_spm_model(tiny_config(""))
    path = tmp_path / "best.weights.h5"
    save_weights_atomically(model, str(path))
    before = path.read_bytes()

    class Interrupted(Exception):
        pass

    def fail(filepath):
        open(filepath, "wb").write(b"half a file")
        raise Interrupted
    model.save_weights = fail
    with pytest.raises(Interrupted):
        save_weights_atomically(model, str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["best.weights.h5"]
    model.load_weights(str(path))


def test_a_worker_has_one_scratch_folder_per_run():
    from utils.training import worker_scratch_dir

    a, b = worker_scratch_dir("runs/x", 1), worker_scratch_dir("runs/x", 2)
    assert a != b and os.path.dirname(a) == os.path.dirname(b)
    assert worker_scratch_dir("runs/x", 1) == a and worker_scratch_dir("runs/y", 1) != a


def test_an_evaluation_that_cannot_read_its_pictures_is_an_error_naming_the_folder(tmp_path, synth_dir):
    """More than 1% of the validation pictures unusable stops the training loop's evaluation
    (the Evaluator of the loop); model_val.py's evaluator keeps skipping with a warning."""
    from nets.spm_model import build_spm_model
    from training_helpers import synthetic_config
    from utils.evaluation import Evaluator

    cfg = synthetic_config(str(tmp_path), synth_dir)
    model = build_spm_model(cfg)
    strict = Evaluator(cfg, max_skipped_fraction=0.01)
    strict.records[1] = dataclasses.replace(strict.records[1], image_path=str(tmp_path / "gone.jpg"))
    with pytest.raises(ValueError, match=r"could not use 1 of 4 validation images .* is the image folder .* right"):
        strict(model)
    lenient = Evaluator(cfg, records=strict.records)
    assert lenient(model)["skipped_images"] == 1


@pytest.mark.parametrize("wrong", ["val_images", "val_json"])
def test_a_wrong_validation_path_stops_before_the_first_step(tmp_path, synth_dir, capsys, wrong):
    """A wrong --val-images (every picture missing) or --val-json: main.py exits with 2 and one
    line naming the path before any training step (no checkpoint, no Epoch line), instead of
    scoring 0.0 at every evaluation or failing epochs later."""
    import main

    paths = os.path.join(synth_dir, os.listdir(synth_dir)[0])
    given = {"train_json": os.path.join(paths, "train.json"), "train_images": os.path.join(paths, "train"),
             "val_json": os.path.join(paths, "val.json"), "val_images": os.path.join(paths, "val")}
    given[wrong] = str(tmp_path / ("no_such_folder" if wrong == "val_images" else "no_such.json"))
    args = main.build_parser("test").parse_args(
        ["--run-dir", str(tmp_path / "run"), "--dataset", "ai_challenger",
         *[x for k, v in given.items() for x in ("--" + k.replace("_", "-"), v)],
         "--input-height", "64", "--input-width", "64", "--batch-size", "2", "--tiny-width", "8",
         "--tiny-stem-channels", "16", "--head-channels", "16", "--epochs", "1", "--steps-per-epoch", "2"])
    assert main.run_cli(args) == 2
    out = capsys.readouterr()
    err = out.err.strip().splitlines()[-1]
    assert err.startswith("error: ") and given[wrong] in err and "Traceback" not in out.err
    assert "Epoch 1/1" not in out.out and not (tmp_path / "run" / "checkpoints").exists()


def test_the_learning_rate_schedules_against_values_computed_by_hand():
    """SpmLearningRate, a pure function of the optimizer step: warm-up (step + 1) / W, then the
    step schedule (x factor at each boundary epoch) or the cosine (the default presets')."""
    from utils.training import SpmLearningRate

    step = SpmLearningRate(1e-3, steps_per_epoch=10, total_steps=50, kind="step", decay_epochs=(2, 4),
                           decay_factor=0.1, warmup_steps=5)
    expected = {0: 1e-3 / 5, 2: 3e-3 / 5, 4: 1e-3, 19: 1e-3, 20: 1e-4, 39: 1e-4, 40: 1e-5, 49: 1e-5}
    for s, lr in expected.items():
        assert float(step(s)) == pytest.approx(lr, rel=1e-5), s
    cosine = SpmLearningRate(1e-3, steps_per_epoch=10, total_steps=100, kind="cosine", warmup_steps=10)
    expected = {0: 1e-4, 9: 1e-3, 10: 1e-3, 55: 5e-4, 70: 0.5e-3 * (1 + np.cos(np.pi * 60 / 90)), 100: 0.0}
    for s, lr in expected.items():
        assert float(cosine(s)) == pytest.approx(lr, rel=1e-5, abs=1e-12), s


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_weight_decay_shrinks_the_weights_by_lr_times_decay(optimizer):
    """--weight-decay (AdamW for adam, SGD's own for sgd): a step with a zero gradient multiplies
    each weight by 1 - lr x decay."""
    import tensorflow as tf

    from utils.training import build_optimizer

    cfg = tiny_config("", optimizer=optimizer, weight_decay=0.1, lr=0.01, warmup_steps=0)
    opt = build_optimizer(cfg, steps_per_epoch=10)
    assert type(opt).__name__ == ("AdamW" if optimizer == "adam" else "SGD")
    w = tf.Variable([[1.0, -2.0], [0.5, 4.0]])
    opt.build([w])
    opt.apply_gradients([(tf.zeros_like(w), w)])
    np.testing.assert_allclose(w.numpy(), np.array([[1.0, -2.0], [0.5, 4.0]]) * (1 - 0.01 * 0.1), rtol=1e-6)
