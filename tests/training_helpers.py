"""Small fixtures for the training tests: a tiny config and an in-memory input pipeline.

Also runnable as a script (``python3 tests/training_helpers.py MODE OUT``) so that tests can run
strategies that must be configured before TensorFlow starts (logical CPU devices, TF_CONFIG)
in a fresh process.
"""

import glob
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the test processes' TensorFlow setting (Grappler off): tests/site/sitecustomize.py
SITE = os.path.join(ROOT, "tests", "site")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from config import get_preset  # noqa: E402


def subprocess_env(**extra):
    """The environment of a training subprocess: this one without TF_CONFIG, no GPU visible
    (the tests run on the CPU, also on a GPU host; the launcher sets its workers' own), the
    repository on PYTHONPATH and tests/site (Grappler off: tests/site/sitecustomize.py), plus
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join([ROOT, SITE]),
               CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def load_tool(name: str):
    """The module of ``tools/<name>.py``, to call its ``main(argv)`` in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name: str, *args):
    """``python3 tools/<name>.py ARGS`` in this process (the interpreter start and TensorFlow's
    import are most of a small tool run): a ``subprocess.CompletedProcess`` with the exit code, the
    printed output and the log records written to stderr. An exception propagates (where the
    command line would print a traceback)."""
    import contextlib
    import io
    import logging
    import subprocess

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = load_tool(name.removesuffix(".py")).main(argv)
            except SystemExit as e:                      # argparse, or raise SystemExit("message")
                code = e.code
                if code is not None and not isinstance(code, int):      # as the interpreter does
                    print(code, file=sys.stderr)
                    code = 1
    finally:
        root.removeHandler(handler)
    return subprocess.CompletedProcess([name, *argv], code or 0, out.getvalue(), err.getvalue())


def tiny_config(run_dir: str = "", **overrides):
    """hrnet_tiny (width 8, one high-resolution module per stage: a shorter trace) at 64x64, batch
    2 per replica, SGD on the step schedule without warm-up, the paper's two heads
    (``joint_heatmaps=True`` for the preset's third: tests/test_heatmaps.py and the replica test)
    and the plain score (no flip testing); everything else from the tiny preset. SGD: Adam's
    update, traced op by op for each of the trunk's 138 variables, is a third of a trainer's first
    call (10.3 s against 6.9 s here); the tests about the optimizer's state ask for ``adam``, and
    the command-line runs train with the presets' Adam."""
    base = dict(input_height=64, input_width=64, batch_size=2, tiny_width=8, tiny_modules=(1, 1, 1),
                tiny_stem_channels=16, head_channels=16, sigma=1.5, tau=2.0, optimizer="sgd",
                epochs=1, steps_per_epoch=2, lr=1e-3, lr_decay_epochs=(), log_every_steps=1,
                lr_schedule="step", warmup_steps=0, joint_heatmaps=False, eval_flip=False, run_dir=run_dir)
    base.update(overrides)
    return get_preset("tiny_synthetic").replace(**base)


def fixed_batch(cfg, size: int, seed: int = 0):
    """A deterministic batch of drawn people: (uint8 images [size, H, W, 3], labels), the labels
    as InputPipeline.dataset() yields them (padded keypoints and boxes, packed ignore bits)."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = cfg.data.input_height, cfg.data.input_width
    oh, ow = cfg.output_shape
    J, P = cfg.skeleton.num_joints, cfg.data.max_people_per_image
    images = np.zeros((size, h, w, 3), np.uint8)
    labels = {"keypoints": np.zeros((size, P, J, 3), np.float32), "boxes": np.zeros((size, P, 4), np.float32),
              "ignore": np.zeros((size, oh, (ow + 7) // 8), np.uint8),
              "colour": np.tile(np.array([[1.0, 0.0]], np.float32), (size, 1))}
    for i in range(size):
        image = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8)
        centre = rng.uniform([w * 0.3, h * 0.3], [w * 0.7, h * 0.7])
        kps = np.concatenate([centre + rng.normal(0, w * 0.12, size=(J, 2)), np.full((J, 1), 2.0)], 1)
        kps[:, :2] = np.clip(kps[:, :2], 1, [w - 2, h - 2])
        for (x, y) in kps[:, :2]:
            cv2.circle(image, (int(x), int(y)), 2, (255, 200, 50), -1)
        images[i] = image
        labels["keypoints"][i, 0] = kps
        labels["boxes"][i, 0] = np.concatenate([kps[:, :2].min(0), kps[:, :2].max(0)])
    return images, labels


def random_head_run(run_dir: str, **overrides):
    """Save a tiny run (config.json + final.weights.h5) whose output layers are random, so its
    maps have distinct peaks (an untrained model's are flat). Returns the config."""
    from nets.spm_model import build_spm_model

    import keras

    cfg = tiny_config(run_dir, **overrides)
    keras.utils.set_random_seed(0)
    model = build_spm_model(cfg)
    rng = np.random.default_rng(0)
    outputs = [("head.root.out", 0.3), ("head.disp.out", 0.002)]
    if cfg.model.joint_heatmaps:
        outputs.append(("head.joints.out", 0.3))
    for name, std in outputs:
        layer = model.get_layer(name)
        kernel, bias = layer.get_weights()
        layer.set_weights([rng.normal(0, std, kernel.shape).astype(np.float32), bias])
    cfg.save(run_dir)
    model.save_weights(os.path.join(run_dir, "final.weights.h5"))
    return cfg


class _NoSkips:
    count = 0

    def summary(self):
        return "no image skipped"


class FixedPipeline:
    """Stands in for dataset.pipeline.InputPipeline: the same global batch forever.

    Under a strategy each input pipeline yields its replicas' rows of the global batch (per-replica
    batches, as InputPipeline.dataset(input_context=...) does).
    """

    skipped = _NoSkips()

    def __init__(self, images, labels, num_examples: int = 0):
        self.images, self.labels = images, labels
        self.num_examples = num_examples or len(images)

    def __len__(self):
        return self.num_examples

    def dataset(self, batch_size=None, input_context=None, repeat=False, start_step=0, seed=None):
        import tensorflow as tf

        images, labels = self.images, self.labels
        per_replica = len(images)
        if input_context is not None:
            per_replica = input_context.get_per_replica_batch_size(len(images))
            lo = input_context.input_pipeline_id * per_replica * (
                input_context.num_replicas_in_sync // input_context.num_input_pipelines)
            n = per_replica * input_context.num_replicas_in_sync // input_context.num_input_pipelines
            images = images[lo:lo + n]
            labels = {k: v[lo:lo + n] for k, v in labels.items()}
        ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(per_replica).repeat()
        return ds


def no_eval(model, cfg):
    return {"score": 0.0}


def randomise_output_kernels(model, std=0.01, seed=0):
    """The output kernels start at zero (nets/spm_model.py), which stops every gradient below
    them in the first step; random ones make one step move every layer."""
    rng = np.random.default_rng(seed)
    for name in ("head.root.out", "head.disp.out", "head.joints.out"):
        if name == "head.joints.out" and not any(layer.name == name for layer in model.layers):
            continue
        layer = model.get_layer(name)
        kernel, bias = layer.get_weights()
        layer.set_weights([rng.normal(0, std, kernel.shape).astype(np.float32), bias])


def synthetic_config(run_dir: str, synth_dir: str, **overrides):
    """tiny_config on a small synthetic set (for the default evaluator): 8 training, 4 val images,
    a low decoder threshold."""
    overrides.setdefault("score_threshold", 0.02)       # random heads' peaks are found
    return tiny_config(run_dir, synthetic_dir=synth_dir, synthetic_train_images=8,
                       synthetic_val_images=4, **overrides)


def nan_at(*bad_steps: int, replica: int = -1):
    """A Trainer gradient_hook that makes the gradients of ``replica`` (-1: every replica)
    non-finite at the steps ``bad_steps``."""
    import tensorflow as tf

    def hook(grads, step):
        rid = tf.distribute.get_replica_context().replica_id_in_sync_group
        at = tf.reduce_any(tf.equal(step, tf.constant(bad_steps, tf.int64)))
        bad = at & ((rid == replica) if replica >= 0 else True)
        return [g + tf.where(bad, tf.constant(float("inf"), g.dtype), tf.constant(0.0, g.dtype)) for g in grads]

    return hook


# ----------------------------------------------------------------------------- watching runs

def newest_step(ckpt_dir) -> int:
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(ckpt_dir))
    return int(latest.rsplit("-", 1)[1])


def wait_for(path, text, procs, timeout=240, count=1):
    """Until ``text`` appears (``count`` times) in the file ``path`` (a process's console), while
    ``procs`` run."""
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(path) and open(path).read().count(text) >= count:
            return True
        time.sleep(0.1)
    return False


def relative_moves(before, after, reference):
    """Per variable, the relative error of a step's move against a reference run's move from the
    same weights: ``|(after - before) - (reference - before)| / |reference - before|``; every
    variable must have moved in the reference."""
    errors = []
    for i, (b, a, r) in enumerate(zip(before, after, reference)):
        assert np.linalg.norm(r - b) > 0, f"variable {i} did not move"
        errors.append(np.linalg.norm((a - b) - (r - b)) / np.linalg.norm(r - b))
    return np.array(errors)


def saved_steps(ckpts):
    return sorted(int(os.path.basename(f)[5:-6]) for f in glob.glob(str(ckpts / "ckpt-*.index")))


def _trainable(trainer):
    return [v.numpy().astype(np.float32) for v in trainer.model.trainable_variables]


def run_mode(mode: str, out: str, *extra: str):
    """Modes run in a fresh process: 'replicas' (2 logical CPUs vs 1 device), 'worker' (TF_CONFIG)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    from utils.training import Trainer

    if mode == "replicas":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from nets.spm_model import build_spm_model
        from utils.evaluation import evaluate_model

        tf.keras.utils.set_random_seed(0)
        results = {}
        # One strategy object per process, as in training: two MirroredStrategy objects would
        # draw the same collective instance keys.
        two_cpus, one_cpu = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), tf.distribute.OneDeviceStrategy("/cpu:0")
        # One SGD step on 2 replicas against one device on the joined batch, 8 different
        # pictures (4 per replica): 2 replicas in float32 and under float16 loss scaling, each
        # against the float32 step of one device. SGD: the weights after a step differ from the
        # 1-device step by lr x (summation-order noise of the gradients; float16's precision);
        # Adam's first step, lr g / (|g| + eps), would amplify that noise for gradients near
        # eps. BatchNorm is frozen (its layers not trainable: Keras runs them in inference mode),
        # so the per-replica batch statistics, which legitimately differ from the joined batch's,
        # stay out of the comparison; everything else (the shard each replica reads, the
        # all-reduce, the loss normalisation and scaling, the finite decision) is compared.
        def frozen(trainer):
            for layer in trainer.model._flatten_layers():
                if isinstance(layer, tf.keras.layers.BatchNormalization):
                    layer.trainable = False
            return trainer

        common = dict(optimizer="sgd", lr=1e-2, steps_per_call=1, joint_heatmaps=True)   # the default run's heads
        cfg1 = synthetic_config(os.path.join(out, "one"), extra[0], batch_size=8, **common)
        pipe = FixedPipeline(*fixed_batch(cfg1, 8))
        one = frozen(Trainer(cfg1, one_cpu, evaluate_fn=no_eval, pipeline=pipe))
        randomise_output_kernels(one.model)
        initial, before = one.model.get_weights(), _trainable(one)
        run_one = one.run_steps(iter(one.dist_dataset), 1)
        after_one = _trainable(one)
        for precision in ("", "float16"):
            cfg2 = synthetic_config(os.path.join(out, f"two{precision}"), extra[0], batch_size=4,
                                    mixed_precision=precision, **common)
            two = frozen(Trainer(cfg2, two_cpus, pipeline=pipe))
            two.model.set_weights(initial)
            if precision:
                # a scale at which the step does not overflow
                two.optimizer.dynamic_scale.assign(256.0)
            run_two = two.run_steps(iter(two.dist_dataset), 1)
            tag = precision or "float32"
            results.update({f"{tag}_loss_two": run_two["total"], f"{tag}_loss_one": run_one["total"],
                            f"{tag}_skipped_two": len(run_two["skipped"]), f"{tag}_skipped_one": len(run_one["skipped"]),
                            f"{tag}_variables": len(before),
                            **{f"{tag}_two_{i}": w for i, w in enumerate(_trainable(two))},
                            **{f"{tag}_one_{i}": w for i, w in enumerate(after_one)},
                            **{f"{tag}_before_{i}": w for i, w in enumerate(before)}})
            if not precision:
                # The default evaluator under 2 replicas == the 1-device evaluation of the same
                # weights (random output layers find people).
                randomise_output_kernels(two.model, std=0.3)
                under_strategy = two.evaluate()
                single = build_spm_model(cfg2)
                single.set_weights(two.model.get_weights())
                alone = evaluate_model(single, cfg2)
                for k in ("score", "ap50", "predicted_people"):
                    results[f"eval_strategy_{k}"], results[f"eval_alone_{k}"] = under_strategy[k], alone[k]
        # Gradient clipping on 2 replicas with distinct data (a batch of 8 different images, 4 per
        # replica) under float16 loss scaling (float32's clip is the same ops without the scale;
        # on one device: test_training.py's XLA test): SGD's first step moves the weights by lr x
        # the clipped gradient, so the move's global norm is lr x the limit when the all-reduced
        # gradient is clipped (a per-replica clip gives up to twice that, a clip of the scaled
        # gradient a 256th).
        # lr 1 and a limit of 1e-2: each weight moves by far more than float32's spacing at its
        # value (with a move of 1e-5 in norm, rounding of the weights was 0.1% of it)
        cfg = synthetic_config(os.path.join(out, "clipfloat16"), extra[0], batch_size=4, optimizer="sgd",
                               lr=1.0, mixed_precision="float16", steps_per_call=1, grad_clip_norm=1e-2)
        images, labels = fixed_batch(cfg, 8)
        # replica 1 overflows in step 2, after the clipped step (BatchNorm trains)
        clipped = Trainer(cfg, two_cpus, evaluate_fn=no_eval, pipeline=FixedPipeline(images, labels),
                          gradient_hook=nan_at(2, replica=1))
        randomise_output_kernels(clipped.model)
        clipped.optimizer.dynamic_scale.assign(256.0)
        before = _trainable(clipped)
        it_clipped = iter(clipped.dist_dataset)
        run = clipped.run_steps(it_clipped, 1)
        results["clip_float16_moved"] = float(np.sqrt(sum(np.sum((np.float64(a) - b) ** 2)
                                                          for a, b in zip(_trainable(clipped), before))))
        results["clip_float16_skipped"] = len(run["skipped"])
        # Replica 1's gradient is infinite at step 2: the update is skipped on both replicas and
        # the loss scale falls; step 3 trains.
        per_replica = lambda: [  # noqa: E731
            [np.array(t) for t in clipped.strategy.experimental_local_results(v)]
            for v in clipped.model.trainable_variables]
        replicas_before, iterations = per_replica(), int(clipped.optimizer.iterations.numpy())
        scale_before = float(clipped.optimizer.dynamic_scale.numpy())
        first = clipped.run_steps(it_clipped, 1)
        replicas_after = per_replica()
        second = clipped.run_steps(it_clipped, 1)
        results.update(overflow_scale_before=scale_before, overflow_scale_after=first["loss_scale"],
                       overflow_skipped=first["skipped"], overflow_second_skipped=len(second["skipped"]),
                       overflow_iterations=int(clipped.optimizer.iterations.numpy()) - iterations,
                       overflow_unchanged=all(np.array_equal(b, a)
                                              for bs, as_ in zip(replicas_before, replicas_after)
                                              for b, a in zip(bs, as_)),
                       overflow_finite_after=all(np.isfinite(w).all() for w in _trainable(clipped)),
                       overflow_moved=any(not np.array_equal(b[0], v.numpy()) for b, v in
                                          zip(replicas_before, clipped.model.trainable_variables)))
        np.savez(os.path.join(out, "replicas.npz"), **results)
    elif mode == "worker":
        from utils.distribute import make_strategy

        strategy = make_strategy()
        # Synchronised BatchNorm: without it each worker keeps moving statistics of its own shard
        # (legitimately different); with it every variable must be identical on both workers.
        steps, every = (int(v) for v in extra[1:3]) if len(extra) > 2 else (2, 0)
        cfg = synthetic_config(os.path.join(out, "run"), extra[0], batch_size=2, steps_per_epoch=steps,
                               epochs=1, seed=0, deterministic=True, sync_batchnorm=True,
                               checkpoint_every_steps=every, steps_per_call=1)
        tf.keras.utils.set_random_seed(0)
        images, labels = fixed_batch(cfg, 4)
        trainer = Trainer(cfg, strategy, pipeline=FixedPipeline(images, labels))
        start_step = int(trainer.step.numpy())
        if trainer.resumed_from is None:
            randomise_output_kernels(trainer.model, std=0.3)
        result = trainer.fit()
        task = tf.distribute.cluster_resolver.TFConfigClusterResolver().task_id
        if result["preempted"]:
            np.savez(os.path.join(out, f"worker{task}_preempted.npz"), steps=result["steps"], start_step=start_step)
            sys.exit(75)
        # the run's final evaluation: its score as each worker received it, and the chief's record
        history = json.load(open(os.path.join(out, "run", "history.json"))) if trainer.is_chief else []
        np.savez(os.path.join(out, f"worker{task}.npz"), steps=result["steps"], start_step=start_step,
                 replicas=trainer.replicas, chief=trainer.is_chief, score=result["score"],
                 predicted_people=history[-1]["predicted_people"] if history else -1,
                 history_score=history[-1]["score"] if history else -1.0,
                 **{f"w{i}": w for i, w in enumerate(trainer.model.get_weights())})
    elif mode == "worker_bad_val":
        # A wrong --val-images on every worker (only the chief evaluates, and finds it): every
        # worker must stop with the chief's error instead of waiting in a collective.
        from utils.distribute import make_strategy

        strategy = make_strategy()
        paths = os.path.join(extra[0], sorted(os.listdir(extra[0]))[0])
        cfg = tiny_config(os.path.join(out, "run"), dataset="ai_challenger",
                          train_json=os.path.join(paths, "train.json"), train_images=os.path.join(paths, "train"),
                          val_json=os.path.join(paths, "val.json"), val_images=os.path.join(out, "not_here"))
        try:
            Trainer(cfg, strategy)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    run_mode(sys.argv[1], sys.argv[2], *sys.argv[3:])
