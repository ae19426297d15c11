"""Small fixtures for the training tests: a tiny config and an in-memory input pipeline.

Also runnable as a script (``python3 tests/training_helpers.py MODE OUT``) so that tests can run
strategies that must be configured before TensorFlow starts (logical CPU devices, TF_CONFIG)
in a fresh process.
"""

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from config import get_preset  # noqa: E402


def tiny_config(run_dir: str = "", **overrides):
    """hrnet_tiny at 64x64, batch 2 per replica; everything else from the tiny preset."""
    base = dict(input_height=64, input_width=64, batch_size=2, tiny_width=8,
                tiny_stem_channels=16, head_channels=16, sigma=1.5, tau=2.0,
                epochs=1, steps_per_epoch=2, lr=1e-3, lr_decay_epochs=(), log_every_steps=1,
                run_dir=run_dir)
    base.update(overrides)
    return get_preset("tiny_synthetic").replace(**base)


def fixed_batch(cfg, size: int, seed: int = 0):
    """A deterministic batch (images float32 [size, H, W, 3], SPR targets) of drawn people."""
    import cv2
    from nets.spr import encode

    rng = np.random.default_rng(seed)
    h, w = cfg.data.input_height, cfg.data.input_width
    J = cfg.skeleton.num_joints
    images, targets = [], []
    for _ in range(size):
        image = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8)
        centre = rng.uniform([w * 0.3, h * 0.3], [w * 0.7, h * 0.7])
        kps = np.concatenate([centre + rng.normal(0, w * 0.12, size=(J, 2)), np.full((J, 1), 2.0)], 1)
        kps[:, :2] = np.clip(kps[:, :2], 1, [w - 2, h - 2])
        for (x, y) in kps[:, :2]:
            cv2.circle(image, (int(x), int(y)), 2, (255, 200, 50), -1)
        box = np.concatenate([kps[:, :2].min(0), kps[:, :2].max(0)])[None]
        images.append(image.astype(np.float32))
        targets.append(encode(kps[None], box, cfg.skeleton, cfg.spr, (h, w)))
    batch_targets = {k: np.stack([t[k] for t in targets]) for k in targets[0]}
    return np.stack(images), batch_targets


def random_head_run(run_dir: str, **overrides):
    """Save a tiny run (config.json + final.weights.h5) whose output layers are random, so its
    maps have distinct peaks (an untrained model's are flat). Returns the config."""
    from nets.spm_model import build_spm_model

    cfg = tiny_config(run_dir, **overrides)
    model = build_spm_model(cfg)
    rng = np.random.default_rng(0)
    for name, std in (("head.root.out", 0.3), ("head.disp.out", 0.002)):
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

    def __init__(self, images, targets, num_examples: int = 0):
        self.images, self.targets = images, targets
        self.num_examples = num_examples or len(images)

    def __len__(self):
        return self.num_examples

    def dataset(self, batch_size=None, input_context=None, repeat=False):
        import tensorflow as tf

        images, targets = self.images, self.targets
        per_replica = len(images)
        if input_context is not None:
            per_replica = input_context.get_per_replica_batch_size(len(images))
            lo = input_context.input_pipeline_id * per_replica * (
                input_context.num_replicas_in_sync // input_context.num_input_pipelines)
            n = per_replica * input_context.num_replicas_in_sync // input_context.num_input_pipelines
            images = images[lo:lo + n]
            targets = {k: v[lo:lo + n] for k, v in targets.items()}
        ds = tf.data.Dataset.from_tensor_slices((images, targets)).batch(per_replica).repeat()
        return ds


def no_eval(model, cfg):
    return {"score": 0.0}


def _weights_digest(model):
    return {f"w{i}": w for i, w in enumerate(model.get_weights())}


def run_mode(mode: str, out: str):
    """Modes run in a fresh process: 'replicas' (2 logical CPUs vs 1 device), 'worker' (TF_CONFIG)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    from utils.training import Trainer

    if mode == "replicas":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        # Adam's first step is lr * g / (|g| + eps): for gradients near eps it turns summation-order
        # noise (different on 1 and 2 devices) into differences of up to ~lr * 1e-2; lr 1e-4
        # keeps those under the 1e-5 tolerance while every weight still moves by ~1e-4.
        cfg2 = tiny_config(os.path.join(out, "two"), batch_size=2, sync_batchnorm=True, lr=1e-4)
        cfg1 = tiny_config(os.path.join(out, "one"), batch_size=4, sync_batchnorm=True, lr=1e-4)
        images, targets = fixed_batch(cfg1, 4)
        pipe = FixedPipeline(images, targets)
        two = Trainer(cfg2, tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), evaluate_fn=no_eval,
                      pipeline=pipe)
        one = Trainer(cfg1, tf.distribute.OneDeviceStrategy("/cpu:0"), evaluate_fn=no_eval, pipeline=pipe)
        # The output kernels start at zero (nets/spm_model.py), which stops every gradient
        # below them in the first step; make them random so that one step moves every layer.
        rng = np.random.default_rng(0)
        for name in ("head.root.out", "head.disp.out"):
            layer = two.model.get_layer(name)
            kernel, bias = layer.get_weights()
            layer.set_weights([rng.normal(0, 0.01, kernel.shape).astype(np.float32), bias])
        one.model.set_weights(two.model.get_weights())
        before = one.model.get_weights()
        losses_two = two._train_step(next(iter(two.dist_dataset)))
        losses_one = one._train_step(next(iter(one.dist_dataset)))
        np.savez(os.path.join(out, "replicas.npz"),
                 loss_two=float(losses_two["total"]), loss_one=float(losses_one["total"]),
                 replicas=two.replicas,
                 **{f"two_{i}": w for i, w in enumerate(two.model.get_weights())},
                 **{f"one_{i}": w for i, w in enumerate(one.model.get_weights())},
                 **{f"before_{i}": w for i, w in enumerate(before)})
    elif mode == "worker":
        from utils.distribute import make_strategy

        strategy = make_strategy()
        # Synchronised BatchNorm: without it each worker keeps moving statistics of its own shard
        # (legitimately different); with it every variable must be identical on both workers.
        cfg = tiny_config(os.path.join(out, "run"), batch_size=2, steps_per_epoch=2, epochs=1,
                          seed=0, deterministic=True, sync_batchnorm=True)
        tf.keras.utils.set_random_seed(0)
        images, targets = fixed_batch(cfg, 4)
        trainer = Trainer(cfg, strategy, evaluate_fn=no_eval, pipeline=FixedPipeline(images, targets))
        result = trainer.fit()
        task = tf.distribute.cluster_resolver.TFConfigClusterResolver().task_id
        np.savez(os.path.join(out, f"worker{task}.npz"), steps=result["steps"],
                 replicas=trainer.replicas, chief=trainer.is_chief,
                 **{f"w{i}": w for i, w in enumerate(trainer.model.get_weights())})
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    run_mode(sys.argv[1], sys.argv[2])
