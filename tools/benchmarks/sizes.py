"""``python3 tools/benchmark.py sizes --ckpt RUN``: does a trained model decode right at another size?

    python3 tools/benchmark.py sizes --ckpt runs/tiny_synthetic [--images 6] [--thresholds 0.1,0.2,0.3,0.4,0.5]

For each of the first ``--images`` validation pictures: the picture letterboxed to the training
input (A, e.g. 256x256) is predicted at the training size; the same A padded with black to twice
its width and height (people keep their scale) is predicted at twice the input size. The people
of the two runs are matched (nearest root) and their joints compared in A's pixels: with the
training Z (what ``load_trained_model`` fixes) and with the Z of the larger map (the decoder's
earlier behaviour). With ``--thresholds``, the validation split is also scored at each decoder
``score_threshold`` (the AI Challenger score counts every extra person).
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, List

import numpy as np

from dataset.letterbox import letterbox_image, letterbox_params
from dataset.pipeline import load_records, read_rgb
from utils.evaluation import evaluate_model
from utils.predict import Predictor, load_trained_model, predict_images


def _match_distances(a, b) -> List[float]:
    """Joint distances [px] of the people of ``a`` matched to ``b`` by nearest root."""
    out = []
    for pose, root in zip(a.poses, a.roots):
        if not len(b.roots):
            continue
        k = int(np.argmin(np.linalg.norm(b.roots - root, axis=1)))
        out.extend(np.linalg.norm(b.poses[k] - pose, axis=1).tolist())
    return out


def run_benchmark(name: str, argv: List[str]) -> Dict:
    parser = argparse.ArgumentParser(prog=f"benchmark.py {name}", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a trained run directory")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--thresholds", default="", help="decoder thresholds to score, e.g. 0.1,0.2,0.3")
    args = parser.parse_args(argv)
    model, cfg = load_trained_model(args.ckpt)
    h, w = cfg.data.input_height, cfg.data.input_width
    big_model, big_cfg = load_trained_model(args.ckpt, overrides={"input_height": 2 * h, "input_width": 2 * w})
    small, big = Predictor(model, cfg), Predictor(big_model, big_cfg)
    stale = Predictor(big_model, big_cfg.replace(z_value=0.0))
    records, _ = load_records(cfg, "val")
    fixed, earlier, people = [], [], 0
    for record in records[:args.images]:
        image = read_rgb(record.image_path)
        a = letterbox_image(image, letterbox_params(image.shape[0], image.shape[1], h, w))
        padded = np.zeros((2 * h, 2 * w, 3), np.uint8)
        padded[:h, :w] = a
        at_size, = predict_images(small, [a])
        people += len(at_size.poses)
        fixed += _match_distances(at_size, predict_images(big, [padded])[0])
        earlier += _match_distances(at_size, predict_images(stale, [padded])[0])
    result = {"benchmark": "sizes", "ckpt": os.path.abspath(args.ckpt), "images": args.images, "people": people,
              "input": f"{w}x{h}", "padded_input": f"{2 * w}x{2 * h}",
              "training_z": {"median_px": round(float(np.median(fixed)), 3), "max_px": round(float(np.max(fixed)), 3)},
              "map_z": {"median_px": round(float(np.median(earlier)), 3), "max_px": round(float(np.max(earlier)), 3)}}
    print(f"{people} people in {args.images} pictures, joints of the {w}x{h} run vs the padded "
          f"{2 * w}x{2 * h} run: training Z median {result['training_z']['median_px']} px "
          f"(max {result['training_z']['max_px']}); the larger map's Z median {result['map_z']['median_px']} px")
    if args.thresholds:
        scores = {}
        for t in (float(v) for v in args.thresholds.split(",")):
            r = evaluate_model(model, cfg.replace(score_threshold=t))
            scores[str(t)] = {k: round(float(r[k]), 4) for k in ("score", "ap50", "ap75")}
            print(f"score_threshold {t}: AI Challenger score {scores[str(t)]['score']}, AP@0.5 "
                  f"{scores[str(t)]['ap50']}, AP@0.75 {scores[str(t)]['ap75']}")
        result["thresholds"] = scores
    return result
