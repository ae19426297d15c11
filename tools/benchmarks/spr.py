"""SPR benchmarks (``tools/benchmark.py oracle``, ``decode`` and ``encoder``).

``encoder``: the batched TF encoder the training step runs (``nets.spr.encode_batch``) against
the NumPy reference (``nets.spr.encode``) on every image of the annotation file, at each
``--sizes`` input, for both anchors and both root types: largest difference per map, whether the
displacement weights are identical, and the time per image of each.

``oracle``: the encode -> decode round trip of ground truth, scored officially. Every image's
people are letterboxed into the network input, encoded into SPR targets, the targets are decoded
by the compiled TensorFlow decoder (batch 1 per image), mapped back to the original image and
written as an AI Challenger submission, which the official scorer (``utils/aic_eval.py``) rates
against the annotation file. What the round trip loses (people sharing a root cell, anchors of the
same channel less than about two cells apart) is what no trained network could get back either.

``decode``: decoder time per image on realistic network-like maps: the targets of real people
plus Gaussian noise and spurious blobs, at the configured input size, batch 1.

Times are wall-clock on this machine after warm-up; the decoder is timed as one compiled
``tf.function`` call per image including the transfer of its result to NumPy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import tensorflow as tf

from config.config import Config, add_config_args, config_from_args
from dataset.ai_challenger import read_ai_challenger
from dataset.coco import read_coco, resolve_skeleton
from dataset.convert import estimate_image_sizes, image_sizes_from_dir
from dataset.letterbox import Letterbox, letterbox_params, to_network, to_original
from dataset.records import ImageRecord
from nets import spr
from tools.benchmarks import REPO_ROOT
from utils.aic_eval import evaluate_files, format_warnings
from utils.evaluation import aic_prediction, coco_predictions, score_coco
from utils.predict import Prediction

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "ai_challenger_w32_512"
DEFAULT_REF = os.path.join(REPO_ROOT, "tests", "data",
                           "ai_challenger_keypoint_example", "keypoint_annotations_example.json")


_DESCRIPTIONS = {
    "oracle": "Encode -> decode round trip of ground truth, scored with the official AI Challenger scorer.",
    "encoder": "The TF encoder (encode_batch) against the NumPy reference (encode) on every image.",
    "decode": "Decoder ms per image (batch 1) on noisy maps made from real people's targets.",
}


def _parser(name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"benchmark.py {name}", description=_DESCRIPTIONS[name])
    p.add_argument("--ref", default=DEFAULT_REF, help="AI Challenger or COCO-format annotation file (default: the "
                   "example AI Challenger file; a COCO file is scored with COCOeval and its own skeleton, or --skeleton)")
    p.add_argument("--images", default=None, help="image folder: take image sizes from the files "
                   "(default: the smallest size holding every box and labelled joint)")
    p.add_argument("--input", default=None, metavar="HxW", help="network input size, e.g. 512x512 "
                   "(default: the preset's)")
    p.add_argument("--jit", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the decoder with XLA (default: yes)")
    if name == "oracle":
        p.add_argument("--out", required=True, help="where to write the AI Challenger predictions (json)")
        p.add_argument("--encoder", choices=("numpy", "tf"), default="numpy",
                       help="encode with the NumPy reference (default) or the batched TF encoder "
                            "the training step runs (XLA, batches of 50)")
    elif name == "encoder":
        p.add_argument("--sizes", default="512,256", help="square input sizes to check (default 512,256)")
    else:
        p.add_argument("--num", type=int, default=200, help="images to time (default 200)")
        p.add_argument("--noise", type=float, default=0.05, help="std of the smooth noise on the root map "
                       "(displacement noise is a tenth of it); default 0.05")
    return add_config_args(p)


def _config(args: argparse.Namespace) -> Config:
    if args.preset is None and args.config is None:
        args.preset = DEFAULT_PRESET
    cfg = config_from_args(args)
    if args.input:
        try:
            h, w = (int(v) for v in args.input.lower().split("x"))
        except ValueError:
            raise ValueError(f"--input {args.input!r}: expected HEIGHTxWIDTH, e.g. 512x512") from None
        cfg = cfg.replace(input_height=h, input_width=w)
    if _is_coco(args.ref):
        # a COCO-format file: its own skeleton unless --skeleton names one (FILE.json included)
        skeleton = cfg.data.skeleton if cfg.data.skeleton != "ai_challenger" else "auto"
        return resolve_skeleton(cfg.replace(dataset="coco", train_json=args.ref, skeleton=skeleton,
                                            skeleton_spec={}))
    if cfg.data.skeleton != "ai_challenger":
        raise ValueError(f"AI Challenger files have the ai_challenger skeleton; preset {cfg.preset!r} uses "
                         f"the {cfg.data.skeleton!r} skeleton")
    return cfg


def _is_coco(path: str) -> bool:
    with open(path) as f:
        return f.read(1024).lstrip().startswith("{")


def _records(cfg: Config, args) -> Tuple[List[ImageRecord], object]:
    if cfg.data.dataset == "coco":
        return read_coco(args.ref, args.images, cfg.skeleton)
    return read_ai_challenger(args.ref, args.images, cfg.skeleton)


def _people(records: Sequence[ImageRecord], images: Optional[str],
            input_hw: Tuple[int, int]) -> List[Tuple[Letterbox, np.ndarray, np.ndarray]]:
    """(letterbox, keypoints, boxes in network-input coordinates) of every record."""
    if records and all(r.width and r.height for r in records):        # COCO files give them
        sizes = [(r.width, r.height) for r in records]
    elif images:
        by_id = image_sizes_from_dir([r.image_id for r in records], images)
        sizes = [by_id[r.image_id] for r in records]
    else:
        sizes = estimate_image_sizes(records)
    out = []
    for rec, (width, height) in zip(records, sizes):
        lb = letterbox_params(height, width, *input_hw)
        kps = rec.keypoints.astype(np.float64)
        kps[..., :2] = to_network(kps[..., :2], lb)
        boxes = to_network(rec.boxes.reshape(-1, 2, 2), lb).reshape(-1, 4)
        out.append((lb, kps, boxes))
    return out


def _decoder(cfg: Config, jit_compile: bool):
    return spr.make_decoder(cfg.skeleton, cfg.spr, cfg.output_shape, jit_compile=jit_compile)


def _timed_decode(decoder, root: np.ndarray, disp: np.ndarray):
    """One decoder call on a batch of one; returns (poses, scores, num) as NumPy and seconds.

    The maps are made tensors before the clock starts: a deployed model's maps already are.
    """

    root, disp = tf.constant(root[None]), tf.constant(disp[None])
    t = time.perf_counter()
    out = decoder(root, disp)
    poses, scores, num = out.poses.numpy()[0], out.scores.numpy()[0], int(out.num_people.numpy()[0])
    return poses, scores, num, time.perf_counter() - t


def run_oracle(argv: Sequence[str]) -> Dict:

    args = _parser("oracle").parse_args(list(argv))
    cfg = _config(args)
    input_hw = (cfg.data.input_height, cfg.data.input_width)
    records, stats = _records(cfg, args)
    print(stats.summary())
    people = _people(records, args.images, input_hw)

    decoder = _decoder(cfg, args.jit)
    for _, kps, boxes in people[:5]:                          # warm-up: trace and first runs
        tg = spr.encode(kps, boxes, cfg.skeleton, cfg.spr, input_hw)
        _timed_decode(decoder, tg["root"], tg["disp"])
    encode_s = decode_s = 0.0
    tf_targets = None
    if args.encoder == "tf":
        encode_s, tf_targets = _tf_encode_all(cfg, people, input_hw)
    predictions = []
    found = 0
    for i, (rec, (lb, kps, boxes)) in enumerate(zip(records, people)):
        t = time.perf_counter()
        if tf_targets is None:
            tg = spr.encode(kps, boxes, cfg.skeleton, cfg.spr, input_hw)
        else:
            tg = {k: v[i] for k, v in tf_targets.items()}
        encode_s += time.perf_counter() - t
        poses, scores, num, seconds = _timed_decode(decoder, tg["root"], tg["disp"])
        decode_s += seconds
        found += num
        predictions.append(Prediction(rec, to_original(poses[:num], lb), scores[:num].astype(np.float64),
                                      np.zeros((num, 2))))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    coco = cfg.data.dataset == "coco"
    with open(args.out, "w") as f:
        json.dump(coco_predictions(predictions) if coco else
                  [aic_prediction(p.record.image_id, p.poses) for p in predictions], f)
    if coco:
        scored = score_coco(args.ref, predictions, [r.image_id for r in records], oks_sigmas=cfg.skeleton.oks_sigmas)
        score, reference_people, metric = scored["score"], int(sum(r.num_people for r in records)), "COCO AP"
    else:
        result = evaluate_files(args.ref, args.out)
        for line in format_warnings(result.warnings, 5):
            print("scorer:", line)
        score, reference_people, metric = result.score, result.num_people, "AI Challenger score"
    n = max(len(records), 1)
    summary = {
        "score": round(score, 6), "metric": metric, "skeleton": cfg.skeleton.name,
        "face_depths": {nm: lv for nm, lv in zip(cfg.skeleton.joint_names, cfg.skeleton.levels)
                        if nm in ("nose", "left_eye", "left_ear")} if coco else {},
        "images": len(records),
        "people": int(sum(r.num_people for r in records)),
        "reference_people": reference_people,
        "decoded_people": found,
        "encode_ms_per_image": round(1000 * encode_s / n, 3),
        "decode_ms_per_image": round(1000 * decode_s / n, 3),
        "input": f"{input_hw[0]}x{input_hw[1]}", "jit_compile": args.jit,
        "root_type": cfg.spr.root_type, "anchor": cfg.spr.anchor, "gather": cfg.spr.gather,
        "sigma": cfg.spr.sigma, "tau": cfg.spr.tau, "z_norm": cfg.spr.z_norm,
        "sizes": "images" if args.images else "estimated", "encoder": args.encoder,
    }
    print(f"oracle round trip ({summary['encoder']} encoder, {summary['root_type']}, {summary['anchor']}, {summary['gather']}, "
          f"{summary['input']}, {cfg.skeleton.name} skeleton): {metric} {score:.6f} on {len(records)} images, "
          f"{summary['people']} people ({found} decoded); encode {summary['encode_ms_per_image']} ms, "
          f"decode {summary['decode_ms_per_image']} ms per image; predictions in {args.out}")
    return summary


def _padded(people):
    """float32 keypoints [I, N, J, 3] and boxes [I, N, 4] of ``people``, padded with unlabelled
    people to the most people of an image."""
    n = max(1, max(len(kps) for _, kps, _ in people))
    J = people[0][1].shape[1]
    K = np.zeros((len(people), n, J, 3), np.float32)
    B = np.zeros((len(people), n, 4), np.float32)
    for i, (_, kps, boxes) in enumerate(people):
        K[i, :len(kps)], B[i, :len(boxes)] = kps, boxes
    return K, B


def _tf_encode_all(cfg: Config, people, input_hw, batch: int = 50):
    """Seconds and the targets of every image from the TF encoder (XLA, batches of ``batch``)."""
    encode = tf.function(lambda k, b: spr.encode_batch(k, b, cfg.skeleton, cfg.spr, input_hw), jit_compile=True)
    K, B = _padded(people)
    encode(K[:batch], B[:batch])                              # trace and compile
    out, seconds = {}, 0.0
    for s in range(0, len(K), batch):
        t = time.perf_counter()
        part = {k: v.numpy() for k, v in encode(K[s:s + batch], B[s:s + batch]).items()}
        seconds += time.perf_counter() - t
        for k, v in part.items():
            out.setdefault(k, []).append(v)
    return seconds, {k: np.concatenate(v) for k, v in out.items()}


def run_encoder(argv: Sequence[str]) -> Dict:
    args = _parser("encoder").parse_args(list(argv))
    cfg = _config(args)
    records, _ = _records(cfg, args)
    rows = []
    for side in (int(v) for v in args.sizes.split(",")):
        people = [(lb, kps.astype(np.float32), boxes.astype(np.float32))
                  for lb, kps, boxes in _people(records, args.images, (side, side))]
        for anchor in ("parent", "root"):
            for root_type in ("centroid", "bbox_center"):
                c = cfg.replace(input_height=side, input_width=side, anchor=anchor, root_type=root_type)
                tf_s, got = _tf_encode_all(c, people, (side, side))
                t = time.perf_counter()
                ref = [spr.encode(k, b, c.skeleton, c.spr, (side, side)) for _, k, b in people]
                np_s = time.perf_counter() - t
                worst = {k: float(max(np.abs(got[k][i] - r[k]).max() for i, r in enumerate(ref))) for k in ref[0]}
                same_weights = all(np.array_equal(got["disp_weight"][i], r["disp_weight"]) for i, r in enumerate(ref))
                rows.append({"input": side, "anchor": anchor, "root_type": root_type, "images": len(ref),
                             "max_abs_difference": worst, "disp_weight_identical": same_weights,
                             "numpy_ms_per_image": round(1000 * np_s / len(ref), 3),
                             "tf_xla_cpu_ms_per_image": round(1000 * tf_s / len(ref), 3)})
                print(f"{side}x{side} {anchor:6s} {root_type:11s}: {len(ref)} images, weights identical "
                      f"{same_weights}, max |TF - NumPy| " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) +
                      f"; NumPy {rows[-1]['numpy_ms_per_image']} ms, TF (XLA, CPU) "
                      f"{rows[-1]['tf_xla_cpu_ms_per_image']} ms per image")
    return {"benchmark": "encoder", "rows": rows,
            "all_identical_weights": all(r["disp_weight_identical"] for r in rows),
            "max_abs_difference": max(max(r["max_abs_difference"].values()) for r in rows)}


def noisy_maps(target: Dict[str, np.ndarray], rng: np.random.Generator, noise: float,
               blobs: int = 4) -> Tuple[np.ndarray, np.ndarray]:
    """Network-like maps from targets: smooth noise (white noise blurred over ~2 cells, like a
    network's output, then scaled to std ``noise``; a tenth of it on the displacements) and
    ``blobs`` spurious root bumps of random width and height up to 0.4."""

    def smooth_noise(shape, std):
        n = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), 2.0)
        n = n.reshape(shape)
        return n * (std / max(float(n.std()), 1e-12))

    root = target["root"][..., 0].copy()
    h, w = root.shape
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(blobs):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        s = rng.uniform(1.5, 5.0)
        root = np.maximum(root, rng.uniform(0.05, 0.4) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / s ** 2))
    root = root + smooth_noise(root.shape, noise)      # unclipped, as a linear head's output
    disp = target["disp"] + smooth_noise(target["disp"].shape, noise / 10)
    return root[..., None].astype(np.float32), disp.astype(np.float32)


def run_decode(argv: Sequence[str]) -> Dict:
    args = _parser("decode").parse_args(list(argv))
    cfg = _config(args)
    input_hw = (cfg.data.input_height, cfg.data.input_width)
    records, _ = read_ai_challenger(args.ref, args.images, cfg.skeleton)
    records = records[:max(args.num, 1)]
    rng = np.random.default_rng(cfg.data.seed)
    maps = [noisy_maps(spr.encode(kps, boxes, cfg.skeleton, cfg.spr, input_hw), rng, args.noise)
            for _, kps, boxes in _people(records, args.images, input_hw)]
    decoder = _decoder(cfg, args.jit)
    for root, disp in maps[:5]:
        _timed_decode(decoder, root, disp)
    seconds, found = [], 0
    for root, disp in maps:
        *_, num, s = _timed_decode(decoder, root, disp)
        seconds.append(s)
        found += num
    ms = 1000 * np.array(seconds)
    summary = {
        "decode_ms_per_image": round(float(ms.mean()), 3),
        "decode_ms_median": round(float(np.median(ms)), 3),
        "decode_ms_p95": round(float(np.percentile(ms, 95)), 3),
        "images": len(maps),
        "people": int(sum(r.num_people for r in records)),
        "decoded_people": found,
        "input": f"{input_hw[0]}x{input_hw[1]}",
        "batch": 1, "jit_compile": args.jit,
        "anchor": cfg.spr.anchor, "gather": cfg.spr.gather, "max_people": cfg.spr.max_people,
    }
    print(f"decoder on noisy maps ({summary['input']}, batch 1, {summary['anchor']}, "
          f"{summary['gather']}): {summary['decode_ms_per_image']} ms per image (median "
          f"{summary['decode_ms_median']}, p95 {summary['decode_ms_p95']}) over {len(maps)} images")
    return summary


def run_benchmark(name: str, argv: Sequence[str]) -> Dict:
    """Entry point of ``tools/benchmark.py`` for the ``oracle`` and ``decode`` subcommands.

    Bad input (a missing or malformed file, an impossible option) ends the program with one
    clear line and a non-zero status instead of a traceback.
    """
    runs = {"oracle": run_oracle, "decode": run_decode, "encoder": run_encoder}
    if name not in runs:
        raise ValueError(f"tools.benchmarks.spr has no benchmark {name!r} ({', '.join(runs)})")
    try:
        return runs[name](argv)
    except (ValueError, OSError) as e:      # AnnotationError is a ValueError
        raise SystemExit(f"benchmark {name}: error: {e}") from None
