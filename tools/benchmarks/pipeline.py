"""``python3 tools/benchmark.py pipeline``: images/s of the training input against decoding alone.

In one run, on the same files and cores:

* **pipeline**: ``InputPipeline(cfg, "train").dataset()`` (file read, JPEG decode, letterbox and
  imgaug augmentation in one warp, colour, padded points): images/s;
* **decode only**: a tf.data pipeline that only reads and decodes the same JPEGs
  (``tf.io.decode_jpeg``, parallel map): images/s, and the ratio of the two;
* **host bytes per image**: what one training image puts into the batch that is copied to the
  device (the uint8 picture plus keypoints, boxes and ignore bits; the SPR targets are rendered
  on the device by ``dataset.pipeline.render_targets``);
* **per-stage costs**: ms per image of each host stage, batch after batch in this thread
  (``warp_only``: one bilinear ``cv2.warpAffine`` of each picture to the input size, the floor of
  the augmentation; ``augment_batch`` includes it), and
  of the TF target rendering per image (batch of ``--batch-size``) on this machine's CPU.

Data: an annotation file and image folder (``--json``/``--images``, AI Challenger or COCO with
``--dataset``), or by default ``--photos N`` photo-like JPEGs of 640x640 pixels written once into
the cache (``tools/benchmarks/photos.py``: synthetic people with photographic texture, about 0.5
bytes per pixel like COCO's JPEGs).

    python3 tools/benchmark.py pipeline [--json F --images DIR [--dataset coco]] [--preset P]
                                        [--input 512x512] [--batches N] [--batch-size B]
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
import tensorflow as tf

from config import get_preset
from dataset.letterbox import letterbox_image, letterbox_params
from dataset.pipeline import InputPipeline, render_targets
from tools.benchmarks.photos import ensure_photos


def _parse_hw(text: str):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input must look like 512x512 (width x height), got {text!r}")
    return h, w


def _stage_costs(pipeline: InputPipeline, batches: int, batch_size: int) -> Dict[str, float]:
    """Mean ms per image of each host stage, batch after batch in this thread (as one call of
    the pipeline's map does it: imgaug runs once per batch)."""
    keys = ("read_file", "decode_jpeg", "warp_only", "augment_batch", "batch_total")
    totals = dict.fromkeys(keys, 0.0)
    H, W = pipeline.input_hw
    rotation = cv2.getRotationMatrix2D((W / 2, H / 2), 15.0, 1.0)
    for k in range(batches):
        indices = [(k * batch_size + i) % len(pipeline) for i in range(batch_size)]
        t0 = time.perf_counter()
        data = []
        for index in indices:
            with open(pipeline.records[index].image_path, "rb") as f:
                data.append(f.read())
        t1 = time.perf_counter()
        pictures = [cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR_RGB) for d in data]
        t2 = time.perf_counter()
        for picture in pictures:                # the cost of one bilinear warp to the input size
            lb = letterbox_params(picture.shape[0], picture.shape[1], H, W)
            scale = np.diag([lb.scale_x, lb.scale_y, 1.0])
            cv2.warpAffine(picture, (np.vstack([rotation, [0, 0, 1]]) @ scale)[:2], (W, H), flags=cv2.INTER_LINEAR)
        t3 = time.perf_counter()
        # The batch's inputs as the pipeline reads them (picture, letterbox, points; untimed).
        reads = [pipeline._read(index) for index in indices]
        t3_augment = time.perf_counter()
        if pipeline.augmenter is not None:
            pipeline.augmenter.augment_batch([r[0] for r in reads], [r[2] for r in reads],
                                             [r[3] for r in reads], k, [r[4] for r in reads],
                                             [r[1] for r in reads])
        else:
            for picture, lb, *_ in reads:
                letterbox_image(picture, lb)
        t4 = time.perf_counter()
        pipeline._train_batch(np.array(indices), np.array([k]))
        t5 = time.perf_counter()
        for key, dt in zip(keys, (t1 - t0, t2 - t1, t3 - t2, t4 - t3_augment, t5 - t4)):
            totals[key] += dt
    return {k: round(1000.0 * v / (batches * batch_size), 3) for k, v in totals.items()}


def images_per_s(iterator, count: int, size_of) -> float:
    """Images per second over ``count`` elements of ``iterator``; ``size_of(element)`` images each."""
    start = time.perf_counter()
    images = 0
    for _ in range(count):
        images += size_of(next(iterator))
    return images / (time.perf_counter() - start)


def run_benchmark(name: str, argv: List[str]) -> dict:
    parser = argparse.ArgumentParser(prog=f"benchmark.py {name}", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", default="ai_challenger_w32_512",
                        help="config preset for the SPR and augmentation settings (default ai_challenger_w32_512)")
    parser.add_argument("--json", default="", help="annotation file (default: the photo-like set)")
    parser.add_argument("--images", default="", help="image folder of --json")
    parser.add_argument("--dataset", default="ai_challenger", choices=("ai_challenger", "coco"),
                        help="format of --json (default ai_challenger)")
    parser.add_argument("--photos", type=int, default=400, help="photo-like JPEGs to use without --json (default 400)")
    parser.add_argument("--photo-side", type=int, default=640, help="their width and height (default 640)")
    parser.add_argument("--input", type=_parse_hw, default=(512, 512), metavar="WxH",
                        help="network input size (default 512x512)")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per round (default 40)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="decode-only and pipeline measured in turn this many times; medians (default 3)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--parallel", type=int, default=-1,
                        help="num_parallel_calls of the map (default -1 = AUTOTUNE)")
    parser.add_argument("--opencv-threads", type=int, default=1,
                        help="cv2.setNumThreads of the pipeline (default 1; 0 = OpenCV's default)")
    parser.add_argument("--no-augment", action="store_true", help="switch augmentation off")
    parser.add_argument("--stage-images", type=int, default=80,
                        help="images for the per-stage timing, in batches of --batch-size (default 80)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if bool(args.json) != bool(args.images):
        parser.error("--json and --images go together")
    if args.json:
        json_path, image_dir, dataset = args.json, args.images, args.dataset
    else:
        json_path, image_dir = ensure_photos(args.photos, args.photo_side)
        dataset = "ai_challenger"

    h, w = args.input
    cfg = get_preset(args.preset).replace(
        dataset=dataset, train_json=json_path, train_images=image_dir,
        skeleton="coco" if dataset == "coco" else "ai_challenger", input_height=h, input_width=w,
        batch_size=args.batch_size, num_parallel_calls=args.parallel, augment=not args.no_augment,
        opencv_threads=args.opencv_threads)
    pipeline = InputPipeline(cfg, "train")
    paths = [r.image_path for r in pipeline.records]
    file_bytes = np.mean([os.path.getsize(p) for p in paths[:200]])
    pixels = np.mean([int(np.prod(tf.io.extract_jpeg_shape(tf.io.read_file(p))[:2])) for p in paths[:200]])
    load_before = os.getloadavg()

    stages = _stage_costs(pipeline, max(1, args.stage_images // args.batch_size), args.batch_size)

    # Decode only: the same files, read and decoded by tf.data's parallel map; measured in turn
    # with the pipeline, --rounds times, each on a fresh iterator after a warm-up (medians).
    decode = tf.data.Dataset.from_tensor_slices(paths).repeat().map(
        lambda p: tf.io.decode_jpeg(tf.io.read_file(p), channels=3, dct_method="INTEGER_ACCURATE"),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).prefetch(tf.data.AUTOTUNE)
    dataset_ = pipeline.dataset(repeat=True)
    decode_rates, pipeline_rates = [], []
    for _ in range(args.rounds):
        decode_iter = iter(decode)
        images_per_s(decode_iter, 3 * args.batch_size, lambda x: 1)
        decode_rates.append(images_per_s(decode_iter, args.batches * args.batch_size, lambda x: 1))
        del decode_iter
        iterator = iter(dataset_)
        images, labels = next(iterator)
        for _ in range(3):                      # warm-up: thread pools, autotuning
            next(iterator)
        pipeline_rates.append(images_per_s(iterator, args.batches, lambda batch: int(batch[0].shape[0])))
        # The iterator's threads call into Python: end them before the interpreter shuts down.
        del iterator
        gc.collect()
    decode_rate, pipeline_rate = float(np.median(decode_rates)), float(np.median(pipeline_rates))
    host_bytes = sum(int(t.numpy().nbytes) for t in (images, *labels.values())) / int(images.shape[0])
    del dataset_

    # The device side, here on this CPU: targets of one batch rendered by the TF encoder.
    render = tf.function(lambda lab: render_targets(lab, cfg), jit_compile=True)
    render(labels)
    t = time.perf_counter()
    for _ in range(5):
        out = render(labels)
    out["disp"].numpy()
    render_ms = 1000.0 * (time.perf_counter() - t) / 5 / int(images.shape[0])
    target_bytes = sum(int(np.prod(v.shape[1:])) * 4 for v in out.values())

    cores = os.cpu_count() or 1
    result = {
        "benchmark": "pipeline",
        "images_per_s": round(pipeline_rate, 1),
        "decode_only_images_per_s": round(decode_rate, 1),
        "rounds_images_per_s": [round(v, 1) for v in pipeline_rates],
        "rounds_decode_only_images_per_s": [round(v, 1) for v in decode_rates],
        "ratio": round(pipeline_rate / decode_rate, 3),
        "host_bytes_per_image": int(host_bytes),
        "target_bytes_per_image_if_sent": target_bytes,
        "render_targets_ms_per_image_cpu": round(render_ms, 3),
        "data": json_path,
        "images": len(paths),
        "mean_file_bytes": int(file_bytes),
        "mean_pixels": int(pixels),
        "bytes_per_pixel": round(float(file_bytes / pixels), 3) if pixels else None,
        "cores": cores,
        "input": f"{w}x{h}",
        "batch_size": args.batch_size,
        "batches": args.batches,
        "augment": not args.no_augment,
        "num_parallel_calls": args.parallel,
        "opencv_threads": args.opencv_threads,
        "stage_ms_per_image": stages,
        "load_average_before": round(load_before[0], 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "skipped_images": pipeline.skipped.count,
    }
    print(f"pipeline: median of {args.rounds} rounds {result['images_per_s']} images/s, decode only {result['decode_only_images_per_s']} "
          f"images/s (ratio {result['ratio']}) at {w}x{h}, batch {args.batch_size}, {cores} cores; "
          f"{len(paths)} files of {int(file_bytes)} bytes ({result['bytes_per_pixel']} bytes/pixel)")
    print(f"host bytes per image {int(host_bytes)} (the SPR targets would be {target_bytes}); "
          f"targets rendered in {render_ms:.2f} ms per image on this CPU")
    print("ms per image, host stages batch after batch in one thread: " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    return result
