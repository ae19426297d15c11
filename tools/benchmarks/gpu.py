"""``python3 tools/benchmark.py gpu``: what a training step and inference cost on this machine's GPU.

    python3 tools/benchmark.py gpu                       # HRNet-W32 at 512, the whole matrix
    python3 tools/benchmark.py gpu --json train.json --images train/ --dataset coco   # your data
    python3 tools/benchmark.py gpu --smoke               # everything, tiny sizes, on the CPU

Runs in one process, on one device (the first visible GPU; ``CUDA_VISIBLE_DEVICES`` picks it):

* **training images/s** of the preset's network (default ``ai_challenger_w32_512``: HRNet-W32 at
  512x512, the real SPM loss and Adam, the training loop's own ``Trainer.run_steps``) at each
  per-GPU batch of ``--batch-sizes`` (16, 32), in each precision of ``--precisions`` (float32,
  bfloat16, float16 with loss scaling) and with and without ``--xla``, fed twice: by the real input
  pipeline (read, decode, augment, on the host) and by one batch kept in memory, so that the
  input's share is the difference; peak GPU memory of each;
* the **input pipeline's** images/s alone, with all host cores;
* **inference** images/s at the preset's input: network and decoder (``utils.predict.Predictor``)
  at batch 1 and ``--infer-batch`` (32), and the exported SavedModel's ``serving_default`` on
  encoded JPEGs at the same batches.

A configuration that fails (out of memory, a precision the GPU lacks) is reported as failed and
the rest goes on. It prints a table and, last, one JSON line. The data default to the built-in
synthetic set (its 2000 training pictures, generated on first use); ``--json``/``--images`` use
yours.

What to expect on paper: HRNet-W32 with the SPM head is about 43 G multiply-accumulates per
512x512 image forward (printed: ``conv_gmacs_per_image``), so a training step (forward plus about
twice that backward) is about 258 GFLOP per image. A GPU that sustains F TFLOP/s in the chosen
precision trains at most about ``F * 1000 / 258`` images/s. Please report your numbers (the JSON
line and the name of your GPU) in an issue.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from typing import Any, Dict, List

import cv2
import keras
import numpy as np
import tensorflow as tf

from config import get_preset
from dataset.pipeline import InputPipeline, SkipCounter
from nets.hrnet import conv_macs
from nets.spm_model import build_spm_model
from utils.export import SIGNATURE, export_saved_model
from utils.predict import Predictor
from tools.benchmarks.pipeline import images_per_s
from utils.training import Trainer

PRECISIONS = ("float32", "bfloat16", "float16")


class InMemoryPipeline:
    """The training loop's input, one batch of the real pipeline repeated from memory."""

    def __init__(self, batch, records: int):
        self.batch, self.records = batch, records
        self.skipped = SkipCounter()                # nothing is read: nothing is ever skipped

    def __len__(self):
        return self.records

    def dataset(self, input_context=None, repeat=True, start_step=0, seed=None, batch_size=None):
        return tf.data.Dataset.from_tensors(self.batch).repeat()


def _train_images_per_s(trainer: Trainer, iterator, steps: int, batch: int, per_call: int) -> float:
    trainer.run_steps(iterator, per_call)                       # trace, warm up
    start = time.perf_counter()
    for _ in range(max(1, steps // per_call)):
        trainer.run_steps(iterator, per_call)
    return batch * max(1, steps // per_call) * per_call / (time.perf_counter() - start)


def _gpu_peak_mb(reset: bool = False):
    if not tf.config.list_physical_devices("GPU"):
        return None
    if reset:
        tf.config.experimental.reset_memory_stats("GPU:0")
        return None
    return round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 20, 1)


def _train_row(cfg, batch: int, precision: str, xla: bool, steps: int, per_call: int) -> Dict[str, Any]:
    row: Dict[str, Any] = {"batch": batch, "precision": precision, "xla": xla}
    run_cfg = cfg.replace(batch_size=batch, mixed_precision="" if precision == "float32" else precision, xla=xla,
                          run_dir=tempfile.mkdtemp(prefix="spm_gpu_bench_"), steps_per_call=per_call,
                          log_every_steps=10 ** 9, max_bad_steps=10 ** 6)
    _gpu_peak_mb(reset=True)
    try:
        real = InputPipeline(run_cfg, "train")
        trainer = Trainer(run_cfg, evaluate_fn=lambda model, cfg: {"score": 0.0}, pipeline=real)
        iterator = iter(trainer.dist_dataset)
        row["pipeline_images_per_s"] = round(_train_images_per_s(trainer, iterator, steps, batch, per_call), 2)
        batch_data = next(iter(real.dataset(repeat=True)))
        del iterator
        trainer.pipeline = InMemoryPipeline(batch_data, len(real))
        memory = trainer.strategy.distribute_datasets_from_function(lambda ctx: trainer.pipeline.dataset(ctx))
        row["in_memory_images_per_s"] = round(_train_images_per_s(trainer, iter(memory), steps, batch, per_call), 2)
        row["input_share"] = round(1.0 - row["pipeline_images_per_s"] / row["in_memory_images_per_s"], 3)
        row["peak_gpu_mb"] = _gpu_peak_mb()
    except (tf.errors.ResourceExhaustedError, tf.errors.InternalError, tf.errors.UnimplementedError,
            tf.errors.InvalidArgumentError, ValueError) as e:
        row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        keras.backend.clear_session()
        keras.mixed_precision.set_global_policy("float32")
        gc.collect()
    return row


def _pipeline_rate(cfg, batches: int) -> float:
    pipeline = InputPipeline(cfg.replace(num_parallel_calls=-1), "train")
    iterator = iter(pipeline.dataset(repeat=True))
    for _ in range(3):                          # warm-up: thread pools, autotuning
        next(iterator)
    rate = images_per_s(iterator, batches, lambda batch: int(batch[0].shape[0]))
    del iterator
    return rate


def _inference(cfg, batches: List[int], repeats: int) -> Dict[str, Any]:
    """Network + decoder (Predictor) and the exported SavedModel on encoded JPEGs."""
    model = build_spm_model(cfg)
    predictor = Predictor(model, cfg)
    H, W = cfg.data.input_height, cfg.data.input_width
    rng = np.random.default_rng(0)
    out: Dict[str, Any] = {}
    export_dir = os.path.join(tempfile.mkdtemp(prefix="spm_gpu_bench_export_"), "saved_model")
    export_saved_model(model, cfg, export_dir)
    serve = tf.saved_model.load(export_dir).signatures[SIGNATURE]
    for b in batches:
        images = tf.constant(rng.uniform(0, 255, (b, H, W, 3)), tf.float32)
        predictor(images).num_people.numpy()                     # trace
        start = time.perf_counter()
        for _ in range(repeats):
            predictor(images).num_people.numpy()
        out[f"network_decoder_batch{b}_images_per_s"] = round(b * repeats / (time.perf_counter() - start), 2)
        jpegs = [cv2.imencode(".jpg", rng.integers(0, 255, (H, W, 3), dtype=np.uint8))[1].tobytes() for _ in range(b)]
        encoded = tf.constant(jpegs)
        serve(images=encoded)["num_people"].numpy()
        start = time.perf_counter()
        for _ in range(repeats):
            serve(images=encoded)["num_people"].numpy()
        out[f"saved_model_batch{b}_images_per_s"] = round(b * repeats / (time.perf_counter() - start), 2)
    out["conv_gmacs_per_image"] = round(conv_macs(model) / 1e9, 3)
    return out


def run_benchmark(name: str, argv: List[str]) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"benchmark.py {name}", description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ai_challenger_w32_512", help="the network and input size measured")
    parser.add_argument("--batch-sizes", default="16,32", help="per-GPU training batches (comma-separated)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="float32, bfloat16, float16")
    parser.add_argument("--xla", default="off,on", help="off, on or off,on")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per configuration")
    parser.add_argument("--steps-per-call", type=int, default=10, help="training steps per tf.function call")
    parser.add_argument("--infer-batch", type=int, default=32, help="the larger inference batch (and 1)")
    parser.add_argument("--json", default="", help="your training annotations (default: the synthetic set)")
    parser.add_argument("--images", default="", help="their image folder")
    parser.add_argument("--dataset", default="ai_challenger", choices=("ai_challenger", "coco"))
    parser.add_argument("--smoke", action="store_true",
                        help="everything with a tiny network at 64x64, batch 2, 2 steps (checks it runs, e.g. on a CPU)")
    args = parser.parse_args(argv)
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise SystemExit(f"--precisions: unknown {sorted(unknown)}; choose from {', '.join(PRECISIONS)}")
    xla_values = {"off": [False], "on": [True], "off,on": [False, True], "on,off": [False, True]}.get(args.xla)
    if xla_values is None:
        raise SystemExit(f"--xla {args.xla!r}: choose off, on or off,on")
    cfg = get_preset(args.preset)
    if args.json:
        if not args.images:
            raise SystemExit("--json needs --images (the folder of its pictures)")
        cfg = cfg.replace(dataset=args.dataset, skeleton="coco" if args.dataset == "coco" else "ai_challenger",
                          train_json=args.json, train_images=args.images, val_json=args.json, val_images=args.images)
    else:
        cfg = cfg.replace(dataset="synthetic", skeleton="ai_challenger")
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    steps, per_call, infer_batch, repeats = args.steps, args.steps_per_call, args.infer_batch, 5
    if args.smoke:
        scratch = tempfile.mkdtemp(prefix="spm_gpu_smoke_")
        cfg = cfg.replace(backbone="hrnet_tiny", tiny_width=8, tiny_modules=(1, 1, 1), tiny_stem_channels=16,
                          head_channels=16, head_blocks=1, input_height=64, input_width=64, sigma=1.5, tau=2.0,
                          synthetic_dir=os.path.join(scratch, "synth"), synthetic_train_images=8,
                          synthetic_val_images=2)
        batches, steps, per_call, infer_batch, repeats = [2], 2, 1, 2, 1
    devices = tf.config.list_physical_devices("GPU")
    device = tf.config.experimental.get_device_details(devices[0]).get("device_name", "GPU") if devices else "CPU"
    rows = [_train_row(cfg, b, p, x, steps, per_call) for b in batches for p in precisions for x in xla_values]
    pipeline_rate = _pipeline_rate(cfg.replace(batch_size=max(batches)), max(2, steps))
    inference = _inference(cfg, [1, infer_batch], repeats)
    print(f"\n{device}, {cfg.model.backbone} at {cfg.data.input_width}x{cfg.data.input_height}, "
          f"{inference['conv_gmacs_per_image']} G conv MACs per image forward "
          f"(~{6 * inference['conv_gmacs_per_image']:.0f} GFLOP per trained image)")
    print("| batch | precision | xla | images/s (real input) | images/s (in memory) | input share | peak GPU MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "failed" in r:
            print(f"| {r['batch']} | {r['precision']} | {r['xla']} | failed: {r['failed']} | | | |")
        else:
            print(f"| {r['batch']} | {r['precision']} | {r['xla']} | {r['pipeline_images_per_s']} | "
                  f"{r['in_memory_images_per_s']} | {r['input_share']:.0%} | {r['peak_gpu_mb']} |")
    print(f"input pipeline alone: {pipeline_rate:.1f} images/s on {os.cpu_count()} host cores")
    print("inference: " + ", ".join(f"{k} {v}" for k, v in inference.items()))
    return {"benchmark": "gpu", "device": device, "preset": args.preset, "backbone": cfg.model.backbone,
            "input": f"{cfg.data.input_width}x{cfg.data.input_height}", "smoke": args.smoke,
            "host_cores": os.cpu_count(), "train": rows, "pipeline_images_per_s": round(pipeline_rate, 2),
            "inference": inference, "tensorflow": tf.__version__}
