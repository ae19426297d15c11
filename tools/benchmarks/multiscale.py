"""``python3 tools/benchmark.py multiscale --ckpt RUN``: does multi-scale testing find small people?

    python3 tools/benchmark.py multiscale --ckpt runs/tiny_synthetic [--canvas 2] \\
        [--scales 1 1,2 1,1.5,2] [--limit 200] [--keep DIR] [--json VAL.json --images VAL_DIR]

Each of the run's validation pictures (AI Challenger format: the synthetic set or AI
Challenger) is pasted at the centre of a black canvas ``--canvas`` times its width and height:
the people keep their pixels but are ``--canvas`` times smaller in the network input than in
training, the case multi-scale testing is for (a large photo with small people). The set goes
to ``--keep`` (or a temporary folder) and is scored with the official AI Challenger metric for
each ``--scales`` setting, through ``predict_records`` as ``model_val.py`` runs it. Each scale
letterboxes the original picture at its own input size, so scale 2 sees the people with twice
the pixels of scale 1. ``--keep`` leaves the set for ``model_val.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Dict, List

import cv2
import numpy as np

from dataset.ai_challenger import read_ai_challenger
from dataset.errors import load_json
from dataset.pipeline import split_paths
from utils.evaluation import score_aic
from utils.predict import Predictor, load_trained_model, parse_scales, predict_records


def canvas_split(ann_json: str, image_dir: str, factor: float, out_dir: str, limit: int) -> str:
    """Write the first ``limit`` images of an AI Challenger split, each at the centre of a black
    canvas ``factor`` times its size, with the annotations shifted, into ``out_dir``; returns the
    new annotation file."""
    entries = load_json(ann_json)[:limit]
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    out = []
    for entry in entries:
        name = entry["image_id"] + ".jpg"
        image = cv2.imread(os.path.join(image_dir, name), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f"{os.path.join(image_dir, name)}: cannot read the picture")
        h, w = image.shape[:2]
        canvas = np.zeros((round(h * factor), round(w * factor), 3), np.uint8)
        dy, dx = (canvas.shape[0] - h) // 2, (canvas.shape[1] - w) // 2
        canvas[dy:dy + h, dx:dx + w] = image
        cv2.imwrite(os.path.join(out_dir, "images", name), canvas, [cv2.IMWRITE_JPEG_QUALITY, 95])
        kps = {k: [v + (dx if i % 3 == 0 else dy) if i % 3 < 2 else v for i, v in enumerate(p)]
               for k, p in entry["keypoint_annotations"].items()}
        boxes = {k: [b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy] for k, b in entry["human_annotations"].items()}
        out.append({**entry, "keypoint_annotations": kps, "human_annotations": boxes})
    path = os.path.join(out_dir, "annotations.json")
    with open(path, "w") as f:
        json.dump(out, f)
    return path


def run_benchmark(name: str, argv: List[str]) -> Dict:
    parser = argparse.ArgumentParser(prog=f"benchmark.py {name}", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a trained run directory (AI Challenger or synthetic)")
    parser.add_argument("--canvas", type=float, default=2.0,
                        help="each picture pasted into a black canvas this many times its size (people smaller)")
    parser.add_argument("--scales", nargs="+", default=["1", "1,2"], help="settings to compare, e.g. 1 1,2")
    parser.add_argument("--limit", type=int, default=200, help="validation pictures used")
    parser.add_argument("--json", default="", help="an AI Challenger-format annotation file (default: the run's val split)")
    parser.add_argument("--images", default="", help="its image folder (with --json)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--keep", default="", help="write the shrunk set here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.canvas < 1:
        raise SystemExit(f"--canvas must be at least 1, got {args.canvas}")
    settings = [parse_scales(s) for s in args.scales]
    model, cfg = load_trained_model(args.ckpt)
    if cfg.data.dataset == "coco":
        raise SystemExit(f"{args.ckpt}: a COCO run; this benchmark reads AI Challenger-format splits")
    if bool(args.json) != bool(args.images):
        raise SystemExit("--json and --images go together")
    ann, images = (args.json, args.images) if args.json else split_paths(cfg, "val")
    out_dir = args.keep or tempfile.mkdtemp(prefix="spm_multiscale_")
    small_json = canvas_split(ann, images, args.canvas, out_dir, args.limit)
    records, _ = read_ai_challenger(small_json, os.path.join(out_dir, "images"))
    rows = []
    for scales in settings:
        start = time.perf_counter()
        predictions, pipeline = predict_records(Predictor(model, cfg, scales=scales), records, args.batch_size)
        seconds = time.perf_counter() - start
        scored = score_aic(small_json, predictions, [r.image_id for r in records])
        rows.append({"scales": list(scales), "score": round(scored["score"], 4), "ap50": round(scored["ap50"], 3),
                     "seconds": round(seconds, 1), "skipped": pipeline.skipped.count})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{len(records)} validation pictures on a canvas x{args.canvas:g}, input "
          f"{cfg.data.input_width}x{cfg.data.input_height}\n| scales | score | AP@0.5 | s |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {','.join(f'{s:g}' for s in r['scales'])} | {r['score']:.4f} | {r['ap50']:.3f} | {r['seconds']:.0f} |")
    return {"benchmark": "multiscale", "ckpt": args.ckpt, "canvas": args.canvas, "images": len(records),
            "input": f"{cfg.data.input_width}x{cfg.data.input_height}", "kept": args.keep, "rows": rows}
