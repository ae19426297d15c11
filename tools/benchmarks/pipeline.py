"""``python3 tools/benchmark.py pipeline``: images/s through the training input pipeline.

Measures the whole training pipeline of ``dataset/pipeline.py`` (file read, JPEG decode,
letterbox, imgaug augmentation, SPR encoding, batching, float cast) on the synthetic data set
(generated into the cache on first use), and, separately, the cost of each stage per image,
timed one image at a time in this thread (OpenCV may still use its own threads), to show where
the time goes.

    python3 tools/benchmark.py pipeline [--preset P] [--input 512x512] [--batches N]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import time
from typing import Dict, List

import cv2
import numpy as np

from config import get_preset
from dataset.letterbox import letterbox_image, letterbox_params, to_network
from dataset.pipeline import InputPipeline
from nets.spr import encode


def _parse_hw(text: str):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input must look like 512x512 (width x height), got {text!r}")
    return h, w


def _stage_costs(pipeline, count: int) -> Dict[str, float]:
    """Mean ms per image of each stage, run one after another in this thread."""

    cfg = pipeline.cfg
    totals = {"read_file": 0.0, "decode_jpeg": 0.0, "letterbox": 0.0, "augment": 0.0,
              "encode_targets": 0.0, "sample_total": 0.0}
    for i in range(count):
        record = pipeline.records[i % len(pipeline)]
        t0 = time.perf_counter()
        with open(record.image_path, "rb") as f:
            data = f.read()
        t1 = time.perf_counter()
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        t2 = time.perf_counter()
        lb = letterbox_params(bgr.shape[0], bgr.shape[1], *pipeline.input_hw)
        image = cv2.cvtColor(letterbox_image(bgr, lb), cv2.COLOR_BGR2RGB)
        kps = record.keypoints.copy()
        kps[..., :2] = to_network(kps[..., :2], lb)
        boxes = to_network(record.boxes.reshape(-1, 2, 2), lb).reshape(-1, 4)
        t3 = time.perf_counter()
        if pipeline.augmenter is not None:
            out = pipeline.augmenter(image, kps, boxes, i)
            kps, boxes = out.keypoints, out.boxes
        t4 = time.perf_counter()
        encode(kps, boxes, pipeline.skeleton, cfg.spr, pipeline.input_hw)
        t5 = time.perf_counter()
        pipeline.sample(i % len(pipeline), i)
        t6 = time.perf_counter()
        for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            totals[key] += dt
    return {k: round(1000.0 * v / count, 2) for k, v in totals.items()}


def run_benchmark(name: str, argv: List[str]) -> dict:
    parser = argparse.ArgumentParser(prog=f"benchmark.py {name}", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", default="tiny_synthetic",
                        help="config preset for the SPR and augmentation settings (data: synthetic)")
    parser.add_argument("--input", type=_parse_hw, default=(512, 512), metavar="WxH",
                        help="network input size (default 512x512)")
    parser.add_argument("--batches", type=int, default=40, help="timed batches (default 40)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--parallel", type=int, default=-1,
                        help="num_parallel_calls of the map (default -1 = AUTOTUNE)")
    parser.add_argument("--no-augment", action="store_true", help="switch augmentation off")
    parser.add_argument("--stage-images", type=int, default=40,
                        help="images for the per-stage timing (default 40)")
    args = parser.parse_args(argv)


    logging.basicConfig(level=logging.INFO, format="%(message)s")

    h, w = args.input
    cfg = get_preset(args.preset).replace(
        dataset="synthetic", skeleton="ai_challenger", input_height=h, input_width=w,
        batch_size=args.batch_size, num_parallel_calls=args.parallel, augment=not args.no_augment)
    pipeline = InputPipeline(cfg, "train")      # generates the synthetic set on first use
    load_before = os.getloadavg()

    stages = _stage_costs(pipeline, args.stage_images)
    dataset = pipeline.dataset(repeat=True)
    iterator = iter(dataset)
    for _ in range(3):                          # warm-up: thread pools, autotuning
        next(iterator)
    start = time.perf_counter()
    images = 0
    for _ in range(args.batches):
        batch, _targets = next(iterator)
        images += int(batch.shape[0])
    seconds = time.perf_counter() - start
    # The iterator's threads call into Python: end them before the interpreter shuts down.
    del iterator, dataset
    gc.collect()

    cores = os.cpu_count() or 1
    result = {
        "benchmark": "pipeline",
        "images_per_s": round(images / seconds, 1),
        "cores": cores,
        "input": f"{w}x{h}",
        "batch_size": args.batch_size,
        "batches": args.batches,
        "augment": not args.no_augment,
        "num_parallel_calls": args.parallel,
        "stage_ms_per_image": stages,
        "single_thread_images_per_s": round(1000.0 / stages["sample_total"], 1),
        "load_average_before": round(load_before[0], 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "skipped_images": pipeline.skipped.count,
    }
    print(f"pipeline: {result['images_per_s']} images/s at {w}x{h}, batch {args.batch_size}, "
          f"{cores} cores (load average {result['load_average_before']} before, "
          f"{result['load_average_after']} after)")
    print("ms per image, stages timed one image at a time (OpenCV may use its own threads): " +
          ", ".join(f"{k} {v}" for k, v in stages.items()))
    return result
