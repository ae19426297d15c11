"""Inference: rebuild a trained model, predict poses in original image coordinates, score them.

One path serves the training loop's evaluation, ``tools/model_val.py``,
``tools/spm_model_test.py``, the ``infer`` benchmark and the export test:

    model, cfg = load_trained_model(run_dir)              # config.json + weights
    predictor = Predictor(model, cfg, flip=False)         # network + in-graph SPR decoder
    results = predict_records(predictor, records)         # poses in original coordinates
    score = evaluate_model(model, cfg)                    # validation split, official metric

Flip testing (``flip=True``) runs the network on the image and on its mirror, mirrors the second
maps back (left and right channels swapped, x displacements negated: ``utils.spr.flip_maps``),
averages the maps, and decodes once.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
from contextlib import redirect_stdout
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from config import CONFIG_FILENAME, Config, load_config
from dataset.records import ImageRecord
from utils.letterbox import to_original

log = logging.getLogger(__name__)

WEIGHT_FILES = ("best.weights.h5", "final.weights.h5")


# ----------------------------------------------------------------------------- loading

def resolve_weights(path: str) -> Tuple[str, str]:
    """(config.json path, weights path) of a run directory or of a ``.weights.h5`` file.

    A run directory gives its best weights, else its final weights, else its latest
    checkpoint; a weights file takes the ``config.json`` beside it.
    """
    if os.path.isdir(path):
        config_path = os.path.join(path, CONFIG_FILENAME)
        for name in WEIGHT_FILES:
            if os.path.exists(os.path.join(path, name)):
                return config_path, os.path.join(path, name)
        import tensorflow as tf

        latest = tf.train.latest_checkpoint(os.path.join(path, "checkpoints"))
        if latest:
            return config_path, latest
        raise FileNotFoundError(f"{path}: no weights found (expected one of {', '.join(WEIGHT_FILES)} "
                                f"or checkpoints/)")
    if not os.path.exists(path) and not os.path.exists(path + ".index"):
        raise FileNotFoundError(f"{path}: no such run directory or weights file")
    return os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILENAME), path


def load_trained_model(path: str, config_path: Optional[str] = None, expect_skeleton: Optional[str] = None,
                       overrides: Optional[Dict[str, Any]] = None):
    """Rebuild the model of a run and load its weights: returns ``(model, cfg)``.

    Args:
        path: a run directory, a ``.weights.h5`` file or a checkpoint prefix.
        config_path: the config to build the model from (default: the run's ``config.json``).
        expect_skeleton: refuse, with a clear message, a model of another skeleton.
        overrides: config fields to change before building, e.g. another ``input_height`` (the
            network is fully convolutional, the weights fit any multiple of 32) or decoder
            settings (``score_threshold``, ``nms_window``).
    """
    import tensorflow as tf
    from nets.spm_model import build_spm_model

    default_config, weights = resolve_weights(path)
    config_path = config_path or default_config
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: no config beside the weights {weights}; pass the "
                                f"run directory, or --config with the training config.json")
    cfg = load_config(config_path)
    if expect_skeleton and cfg.data.skeleton != expect_skeleton:
        raise ValueError(f"{path} is a model of the {cfg.data.skeleton} skeleton "
                         f"({cfg.skeleton.num_joints} joints, preset {cfg.preset}); these annotations "
                         f"need the {expect_skeleton} skeleton")
    if overrides:
        cfg = cfg.replace(**overrides)
    model = build_spm_model(cfg)
    try:
        if weights.endswith(".h5"):
            model.load_weights(weights)
        else:
            tf.train.Checkpoint(model=model).restore(weights).expect_partial().assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{weights}: these weights do not fit the model of {config_path} (backbone "
                         f"{cfg.model.backbone}, head {cfg.model.head}, skeleton {cfg.data.skeleton}): "
                         f"{first}") from None
    return model, cfg


# ----------------------------------------------------------------------------- prediction

class Predictor:
    """Network + SPR decoder in one graph: float32 images [B, H, W, 3] (0..255, letterboxed) ->
    poses [B, K, J, 2] (network-input pixels), scores [B, K], num_people [B]."""

    def __init__(self, model, cfg: Config, flip: bool = False):
        import tensorflow as tf
        from utils.spr import flip_maps, make_decoder

        self.model, self.cfg, self.flip = model, cfg, flip
        skeleton, spr = cfg.skeleton, cfg.spr
        h, w = cfg.data.input_height, cfg.data.input_width

        def maps(images):
            out = model(images, training=False)
            root, disp = tf.cast(out["root"], tf.float32), tf.cast(out["disp"], tf.float32)
            if flip:
                out_f = model(tf.reverse(images, axis=[2]), training=False)
                root_f, disp_f = flip_maps(tf.cast(out_f["root"], tf.float32),
                                           tf.cast(out_f["disp"], tf.float32), skeleton)
                root, disp = (root + root_f) / 2.0, (disp + disp_f) / 2.0
            return root, disp

        self.maps = tf.function(maps, input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32)])
        # The decoder alone is compiled with XLA (about 2.5x faster on CPU, utils/spr.py); the
        # network is left to the regular graph.
        self.decode = make_decoder(skeleton, spr, cfg.output_shape, jit_compile=True)

    def __call__(self, images):
        """:class:`utils.spr.Decoded` of a float32 batch [B, H, W, 3] (0..255, letterboxed)."""
        return self.decode(*self.maps(images))


@dataclasses.dataclass
class Prediction:
    """The people found in one image, in its original coordinates."""
    record: Optional[ImageRecord]   # None for images given as arrays
    poses: np.ndarray               # float64 [n, J, 2]
    scores: np.ndarray              # float64 [n], root peak values
    roots: np.ndarray               # float64 [n, 2], root positions


def _unbatch(decoded, letterboxes, records) -> List[Prediction]:
    """Split a decoded batch into per-image predictions in original coordinates."""
    poses, scores, num, roots = (t.numpy() for t in decoded)
    out = []
    for b, (lb, record) in enumerate(zip(letterboxes, records)):
        n = int(num[b])
        out.append(Prediction(record, to_original(poses[b, :n], lb), scores[b, :n].astype(np.float64),
                              to_original(roots[b, :n], lb)))
    return out


def predict_records(predictor: Predictor, records: Sequence[ImageRecord], batch_size: int = 8,
                    progress: bool = False) -> Tuple[List[Prediction], Any]:
    """Predict every record's image with the evaluation pipeline (decode + letterbox in parallel).

    Returns ``(predictions, pipeline)``; images that cannot be read are skipped with a warning and
    counted in ``pipeline.skipped`` (they get no prediction).
    """
    from dataset.dataset import InputPipeline

    pipeline = InputPipeline(predictor.cfg, "val", records)
    dataset = pipeline.eval_dataset(batch_size)
    bar = None
    if progress:
        import keras

        bar = keras.utils.Progbar(len(records), unit_name="image")
    out: List[Prediction] = []
    done = 0
    for images, info in dataset:
        out.extend(_unbatch(predictor(images), info["letterbox"].numpy(),
                            [pipeline.records[int(i)] for i in info["index"].numpy()]))
        done += len(images)
        if bar is not None:
            bar.update(done)
    return out, pipeline


# ----------------------------------------------------------------------------- scoring

def aic_predictions(predictions: Iterable[Prediction]) -> List[dict]:
    from utils.spr import aic_prediction

    return [aic_prediction(p.record.image_id, p.poses) for p in predictions]


def coco_predictions(predictions: Iterable[Prediction]) -> List[dict]:
    from utils.spr import coco_results

    out: List[dict] = []
    for p in predictions:
        out.extend(coco_results(int(p.record.image_id), p.poses, p.scores))
    return out


def score_aic(ref_json: str, predictions: Sequence[Prediction],
              image_ids: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The official AI Challenger score of ``predictions`` against the annotation file.

    ``image_ids`` restricts the reference to the images that were evaluated (for example the
    first ``max_val_images``); an evaluated image without a prediction (unreadable) counts as
    missed, as the official scorer counts it.
    """
    from utils.aic_eval import load_json, score_predictions

    submit = aic_predictions(predictions)
    ref = load_json(ref_json)
    if image_ids is not None:
        keep = set(image_ids)
        ref = [r for r in ref if not isinstance(r, dict) or r.get("image_id") in keep]
    result = score_predictions(ref, submit, ref_json, "predictions")
    return {"score": float(result.score), "ap50": float(result.ap[0]), "ap75": float(result.ap[5]),
            "images": result.num_images, "people": result.num_people}


COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def score_coco(ann_json: str, predictions: Sequence[Prediction],
               image_ids: Optional[Sequence[str]] = None, verbose: bool = False) -> Dict[str, Any]:
    """COCO keypoint AP with pycocotools' COCOeval (the official COCO metric)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = coco_predictions(predictions)
    if not results:
        return {"score": 0.0, "AP": 0.0, "images": len(predictions)}
    sink = io.StringIO()
    with redirect_stdout(sink):
        gt = COCO(ann_json)
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "keypoints")
        ids = image_ids if image_ids is not None else [p.record.image_id for p in predictions]
        ev.params.imgIds = sorted({int(i) for i in ids})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if verbose:
        print(sink.getvalue().split("DONE", 2)[-1].strip() if "DONE" in sink.getvalue() else sink.getvalue())
    stats = {name: float(v) for name, v in zip(COCO_STAT_NAMES, ev.stats)}
    return {"score": stats["AP"], **stats, "images": len(ev.params.imgIds)}


def score_predictions_for(cfg: Config, ann_json: str, predictions: Sequence[Prediction],
                          image_ids: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The dataset's official metric: AI Challenger score (AIC, synthetic) or COCO AP."""
    if cfg.data.dataset == "coco":
        return score_coco(ann_json, predictions, image_ids)
    return score_aic(ann_json, predictions, image_ids)


class Evaluator:
    """Scores a model on the configured validation split with the dataset's official metric.

    Records, paths and the compiled predictor are made once and reused at every evaluation
    (the training loop evaluates at every epoch end). With a summary ``writer``, pictures of
    the predictions on the first images are logged too.
    """

    def __init__(self, cfg: Config, flip: bool = False, num_pictures: int = 4):
        from dataset.dataset import load_records, split_paths

        self.cfg, self.flip, self.num_pictures = cfg, flip, num_pictures
        self.records, _ = load_records(cfg, "val")
        self.ann_json, _ = split_paths(cfg, "val")
        self._predictor: Optional[Predictor] = None

    def __call__(self, model, writer=None, step: int = 0) -> Dict[str, Any]:
        start = time.time()
        if self._predictor is None or self._predictor.model is not model:
            self._predictor = Predictor(model, self.cfg, flip=self.flip)
        predictions, pipeline = predict_records(self._predictor, self.records, self.cfg.data.batch_size)
        result = score_predictions_for(self.cfg, self.ann_json, predictions,
                                       [r.image_id for r in self.records])
        result["eval_seconds"] = round(time.time() - start, 2)
        result["skipped_images"] = pipeline.skipped.count
        if writer is not None and self.num_pictures:
            import tensorflow as tf

            pictures = [draw_prediction(p, self.cfg) for p in predictions[:self.num_pictures]]
            if pictures:
                size = max(p.shape[0] for p in pictures), max(p.shape[1] for p in pictures)
                with writer.as_default(step=step):
                    tf.summary.image("val/predictions", np.stack([_pad_to(p, size) for p in pictures]),
                                     max_outputs=self.num_pictures)
        return result


def evaluate_model(model, cfg: Config, flip: bool = False) -> Dict[str, Any]:
    """One-off :class:`Evaluator` run: the official score of ``model`` on the validation split."""
    return Evaluator(cfg, flip=flip, num_pictures=0)(model)


# ----------------------------------------------------------------------------- pictures

def read_rgb(path: str) -> np.ndarray:
    """uint8 RGB image of ``path``; a clear error for a missing or unreadable file."""
    import cv2
    from dataset.dataset import read_image

    return cv2.cvtColor(read_image(path), cv2.COLOR_BGR2RGB)


def draw_prediction(prediction: Prediction, cfg: Config, image: Optional[np.ndarray] = None) -> np.ndarray:
    """The record's image with the predicted skeletons, roots and scores drawn (uint8 RGB)."""
    from utils.drawing import draw_poses

    if image is None:
        image = read_rgb(prediction.record.image_path)
    return draw_poses(image.copy(), prediction.poses, cfg.skeleton, scores=prediction.scores,
                      roots=prediction.roots)


def _pad_to(image: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    out = np.zeros((hw[0], hw[1], 3), np.uint8)
    out[:image.shape[0], :image.shape[1]] = image
    return out


def prediction_grid(pictures: Sequence[np.ndarray], columns: int = 3, cell: int = 320) -> np.ndarray:
    """Tile pictures (each scaled to fit a ``cell`` square) into one uint8 RGB image."""
    from utils.letterbox import letterbox_image, letterbox_params

    tiles = [letterbox_image(p, letterbox_params(p.shape[0], p.shape[1], cell, cell)) for p in pictures]
    rows = (len(tiles) + columns - 1) // columns
    grid = np.zeros((rows * cell, columns * cell, 3), np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = t
    return grid


def save_prediction_picture(model, cfg: Config, path: str, num_images: int = 6) -> str:
    """Predictions on the first validation images, tiled into one PNG at ``path``."""
    from dataset.dataset import load_records
    from utils.drawing import save_rgb

    records, _ = load_records(cfg, "val")
    predictions, _ = predict_records(Predictor(model, cfg), records[:num_images], cfg.data.batch_size)
    pictures = [draw_prediction(p, cfg) for p in predictions]
    if not pictures:
        raise ValueError("no readable validation image to draw predictions on")
    return save_rgb(path, prediction_grid(pictures))


def predict_images(predictor: Predictor, images: Sequence[np.ndarray]) -> List[Prediction]:
    """Predictions for in-memory uint8 RGB images of any sizes, each in its own coordinates.

    Letterboxed exactly as in training (utils/letterbox.py)."""
    from utils.letterbox import letterbox_image, letterbox_params

    cfg = predictor.cfg
    h, w = cfg.data.input_height, cfg.data.input_width
    boxes = [letterbox_params(im.shape[0], im.shape[1], h, w) for im in images]
    batch = np.stack([letterbox_image(im, lb) for im, lb in zip(images, boxes)]).astype(np.float32)
    return _unbatch(predictor(batch), boxes, [None] * len(images))


def run_benchmark(name: str, argv: Sequence[str]) -> Dict[str, Any]:
    """``tools/benchmark.py infer``: end-to-end images/s of the model_val path on this machine.

    Reads, decodes and letterboxes the images (tf.data), runs the network and the decoder, and
    maps the poses back, as ``tools/model_val.py`` does; scoring is left out. Without
    ``--ckpt`` the network of ``--preset`` is built with fresh weights (the speed is the same).
    """
    import argparse

    from config import get_preset
    from dataset.dataset import load_records

    parser = argparse.ArgumentParser(prog=f"benchmark.py {name}")
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
        from nets.spm_model import build_spm_model

        cfg = get_preset(args.preset).replace(dataset="synthetic", skeleton="ai_challenger")
        model = build_spm_model(cfg)
    records, _ = load_records(cfg, "val")
    records = records[:args.images]
    predictor = Predictor(model, cfg, flip=args.flip)
    predict_records(predictor, records[:args.batch_size], args.batch_size)      # trace and warm up
    start = time.perf_counter()
    predictions, _ = predict_records(predictor, records, args.batch_size)
    seconds = time.perf_counter() - start
    import os

    result = {"images_per_s": round(len(predictions) / seconds, 2), "images": len(predictions),
              "batch_size": args.batch_size, "input": f"{cfg.data.input_height}x{cfg.data.input_width}",
              "backbone": cfg.model.backbone, "flip": args.flip, "cores": os.cpu_count()}
    print(f"{len(predictions)} images in {seconds:.2f} s: {result['images_per_s']} images/s "
          f"({cfg.model.backbone}, {result['input']}, batch {args.batch_size})")
    return result
