"""``python3 tools/benchmark.py infer``: end-to-end images/s of the ``tools/model_val.py`` path.

Reads, decodes and letterboxes the images (tf.data), runs the network and the decoder, and maps
the poses back, as ``tools/model_val.py`` does; scoring is left out. Without ``--ckpt`` the
network of ``--preset`` is built with fresh weights (the speed is the same).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, Sequence

from config import get_preset
from dataset.pipeline import load_records
from nets.spm_model import build_spm_model
from utils.predict import Predictor, load_trained_model, predict_records


def run_benchmark(name: str, argv: Sequence[str]) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"benchmark.py {name}", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="run directory (default: untrained --preset model)")
    parser.add_argument("--preset", default="tiny_synthetic")
    parser.add_argument("--images", type=int, default=200, help="synthetic validation images to run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--flip", action="store_true")
    args = parser.parse_args(list(argv))
    if args.ckpt:
        model, cfg = load_trained_model(args.ckpt)
        cfg = cfg.replace(dataset="synthetic", skeleton="ai_challenger")
    else:
        cfg = get_preset(args.preset).replace(dataset="synthetic", skeleton="ai_challenger")
        model = build_spm_model(cfg)
    records, _ = load_records(cfg, "val")
    records = records[:args.images]
    predictor = Predictor(model, cfg, flip=args.flip)
    predict_records(predictor, records[:args.batch_size], args.batch_size)      # trace and warm up
    start = time.perf_counter()
    predictions, _ = predict_records(predictor, records, args.batch_size)
    seconds = time.perf_counter() - start
    result = {"images_per_s": round(len(predictions) / seconds, 2), "images": len(predictions),
              "batch_size": args.batch_size, "input": f"{cfg.data.input_height}x{cfg.data.input_width}",
              "backbone": cfg.model.backbone, "flip": args.flip, "cores": os.cpu_count()}
    print(f"{len(predictions)} images in {seconds:.2f} s: {result['images_per_s']} images/s "
          f"({cfg.model.backbone}, {result['input']}, batch {args.batch_size})")
    return result
