"""``python3 tools/benchmark.py model``: size and speed of the SPM model.

    python3 tools/benchmark.py model --backbone hrnet_w32 --input 512x512
    python3 tools/benchmark.py model --backbone hrnet_tiny --input 256x256 --head hrnetv2

Reports trainable parameters and conv multiply-accumulates (whole model and trunk),
``forward_ms`` (batch 1, inference mode, median over ``--runs`` calls after warm-up) and
``train_step_ms`` (batch ``--train-batch``, default 2, one Adam step on the real SPM loss, median likewise). The model's
head settings come from the preset of the backbone (``tiny_synthetic`` for ``hrnet_tiny``,
``ai_challenger_w32_512`` otherwise) unless overridden.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List

import keras
import numpy as np
import tensorflow as tf

from config.config import get_preset
from nets.hrnet import conv_macs, trainable_params
from nets.losses import spm_loss
from nets.spm_model import build_spm_model, get_backbone


def _parse_size(text: str):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input {text!r}: expected HxW, e.g. 512x512") from None
    return h, w


def _median_ms(fn: Callable[[], object], warmup: int, runs: int) -> float:
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _random_targets(model: keras.Model, batch: int, rng: np.random.Generator) -> Dict[str, tf.Tensor]:
    out = {}
    for key in ("root", "disp"):
        shape = (batch,) + tuple(model.output[key].shape[1:])
        out[key] = tf.constant(rng.uniform(0, 1, shape), tf.float32)
        out[key + "_weight"] = tf.constant(rng.uniform(0, 1, shape) < 0.5, tf.float32)
    return out


def run_benchmark(subcommand: str, argv) -> dict:
    parser = argparse.ArgumentParser(prog=f"benchmark.py {subcommand}", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--backbone", default="hrnet_w32")
    parser.add_argument("--head", default=None, help="spm | hrnetv2 (default: the preset's)")
    parser.add_argument("--skeleton", default="ai_challenger", help="ai_challenger | coco")
    parser.add_argument("--input", type=_parse_size, default=(512, 512), help="HxW (default 512x512)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--train-batch", type=int, default=2, help="batch of the timed train step")
    parser.add_argument("--mixed-precision", default="", choices=["", "float16", "bfloat16"],
                        help="Keras mixed-precision policy (default: float32)")
    parser.add_argument("--xla", action="store_true", help="compile the timed functions with XLA")
    args = parser.parse_args(argv)

    cfg = get_preset("tiny_synthetic" if args.backbone == "hrnet_tiny" else "ai_challenger_w32_512")
    overrides = dict(backbone=args.backbone, skeleton=args.skeleton, input_height=args.input[0],
                     input_width=args.input[1], backbone_weights="",
                     dataset="coco" if args.skeleton == "coco" else "ai_challenger")
    if args.head:
        overrides["head"] = args.head
    cfg = cfg.replace(**overrides)

    previous_policy = keras.config.dtype_policy()
    if args.mixed_precision:
        keras.config.set_dtype_policy("mixed_" + args.mixed_precision)
    try:
        model = build_spm_model(cfg)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    trunk = get_backbone(model)
    rng = np.random.default_rng(0)
    h, w = args.input

    image1 = tf.constant(rng.uniform(0, 255, (1, h, w, 3)), tf.float32)
    forward = tf.function(lambda x: model(x, training=False), jit_compile=args.xla)
    forward_ms = _median_ms(lambda: forward(image1)["root"].numpy(), args.warmup, args.runs)

    batch = args.train_batch
    images = tf.constant(rng.uniform(0, 255, (batch, h, w, 3)), tf.float32)
    targets = _random_targets(model, batch, rng)
    optimizer = keras.optimizers.Adam(cfg.train.lr)
    optimizer.build(model.trainable_variables)

    @tf.function(jit_compile=args.xla)
    def train_step(images, targets):
        with tf.GradientTape() as tape:
            losses = spm_loss(targets, model(images, training=True), cfg.loss, global_batch_size=batch)
        grads = tape.gradient(losses["total"], model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return losses["total"]

    train_step_ms = _median_ms(lambda: train_step(images, targets).numpy(), args.warmup, args.runs)
    return {
        "subcommand": subcommand,
        "backbone": args.backbone,
        "head": cfg.model.head,
        "skeleton": args.skeleton,
        "input": f"{h}x{w}",
        "trainable_params": {"model": trainable_params(model), "trunk": trainable_params(trunk)},
        "conv_macs": {"model": conv_macs(model), "trunk": conv_macs(trunk)},
        "forward_ms": round(forward_ms, 1),
        "forward_batch": 1,
        "train_step_ms": round(train_step_ms, 1),
        "train_batch": batch,
        "runs": args.runs,
        "mixed_precision": args.mixed_precision,
        "xla": args.xla,
        "cpu_count": os.cpu_count(),
        "gpus": len(tf.config.list_physical_devices("GPU")),
    }
