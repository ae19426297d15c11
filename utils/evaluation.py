"""Evaluation: predictions as result records, the official metrics, the per-epoch evaluator.

* Result records: :func:`aic_predictions` (AI Challenger submission entries) and
  :func:`coco_predictions` (COCO keypoint results) from :class:`utils.predict.Prediction`.
* Metrics: :func:`score_aic` (the official AI Challenger score, ``utils/aic_eval.py``) and
  :func:`score_coco` (COCO keypoint AP through pycocotools' ``COCOeval``);
  :func:`score_predictions_for` picks the data set's own.
* :class:`Evaluator`: the validation split scored at every epoch end of the training loop
  (records and compiled predictor made once); :func:`evaluate_model` runs it once.
* :func:`save_prediction_picture`: predictions on the first validation images, tiled into a PNG
  (the training loop's ``predictions.png``).
"""

from __future__ import annotations

import io
import time
from contextlib import redirect_stdout
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import tensorflow as tf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from config import Config
from dataset.errors import load_json
from dataset.pipeline import InputPipeline, load_records, read_rgb, split_paths
from utils.aic_eval import score_predictions
from utils.drawing import draw_prediction, pad_to, prediction_grid, save_rgb
from utils.predict import Prediction, Predictor, predict_records

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


# ----------------------------------------------------------------------------- result records

def _flat_keypoints(pose: np.ndarray) -> List[float]:
    """``[x, y, 1] * J`` of a pose [J, 2] (coordinates rounded to 0.01 px)."""
    return [float(v) for v in np.concatenate([np.round(pose, 2), np.ones((len(pose), 1))], axis=1).reshape(-1)]


def aic_prediction(image_id: str, poses: np.ndarray) -> dict:
    """An AI Challenger prediction entry from poses [n, J, 2] in original image coordinates."""
    people = {f"human{i + 1}": _flat_keypoints(pose) for i, pose in enumerate(np.asarray(poses, np.float64))}
    return {"image_id": image_id, "keypoint_annotations": people}


def coco_results(image_id: int, poses: np.ndarray, scores: np.ndarray, category_id: int = 1) -> List[dict]:
    """COCO keypoint result records from poses [n, J, 2] (original coordinates) and scores [n]."""
    return [{"image_id": image_id, "category_id": category_id, "keypoints": _flat_keypoints(pose),
             "score": float(score)}
            for pose, score in zip(np.asarray(poses, np.float64), np.asarray(scores, np.float64))]


def aic_predictions(predictions: Iterable[Prediction]) -> List[dict]:
    return [aic_prediction(p.record.image_id, p.poses) for p in predictions]


def coco_predictions(predictions: Iterable[Prediction]) -> List[dict]:
    out: List[dict] = []
    for p in predictions:
        out.extend(coco_results(int(p.record.image_id), p.poses, p.scores))
    return out


# ----------------------------------------------------------------------------- metrics

def score_aic(ref_json: str, predictions: Sequence[Prediction],
              image_ids: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The official AI Challenger score of ``predictions`` against the annotation file.

    ``image_ids`` restricts the reference to the images that were evaluated (for example the
    subset of ``max_val_images``); an evaluated image without a prediction (unreadable) counts as
    missed, as the official scorer counts it.
    """
    submit = aic_predictions(predictions)
    ref = load_json(ref_json)
    if image_ids is not None:
        keep = set(image_ids)
        ref = [r for r in ref if not isinstance(r, dict) or r.get("image_id") in keep]
    result = score_predictions(ref, submit, ref_json, "predictions")
    return {"score": float(result.score), "ap50": float(result.ap[0]), "ap75": float(result.ap[5]),
            "images": result.num_images, "people": result.num_people}


def score_coco(ann_json: str, predictions: Sequence[Prediction],
               image_ids: Optional[Sequence[str]] = None, verbose: bool = False,
               oks_sigmas: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """COCO keypoint AP with pycocotools' COCOeval (the official COCO metric), with the
    skeleton's OKS sigmas (``oks_sigmas``; default COCO's 17)."""
    results = coco_predictions(predictions)
    if not results:
        return {"score": 0.0, "AP": 0.0, "images": len(predictions)}
    data = load_json(ann_json)
    for ann in data.get("annotations", []):
        if "area" not in ann and len(ann.get("bbox", ())) == 4:
            # CrowdPose's files carry no area: OKS is scaled by the box's (xtcocotools' use_area=False,
            # mmpose's CrowdPose evaluation)
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    sink = io.StringIO()
    with redirect_stdout(sink):
        gt = COCO()
        gt.dataset = data
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "keypoints")
        if oks_sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(oks_sigmas, np.float64)
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
        return score_coco(ann_json, predictions, image_ids, oks_sigmas=cfg.skeleton.oks_sigmas)
    return score_aic(ann_json, predictions, image_ids)


# ----------------------------------------------------------------------------- evaluator

class Evaluator:
    """Scores a model on the configured validation split with the dataset's official metric.

    Records, paths and the compiled predictor are made once and reused at every evaluation
    (the training loop evaluates at every epoch end, then draws ``predictions.png`` with the
    same predictor). ``subset_records``: a fixed random subset of ``cfg.data.max_val_images``
    images (drawn with ``cfg.data.seed``, the same at every epoch and on every resume; all of
    them when the split is not larger), scored by a call with ``subset=True``. With a summary
    ``writer``, pictures of the predictions on the first images are logged too.
    """

    def __init__(self, cfg: Config, flip: bool = False, num_pictures: int = 4, records: Optional[Sequence] = None,
                 max_skipped_fraction: Optional[float] = None):
        self.cfg, self.flip, self.num_pictures = cfg, flip, num_pictures
        self.max_skipped_fraction = max_skipped_fraction
        self.records = list(records) if records is not None else load_records(cfg, "val")[0]
        self.subset_records = self.records
        size = cfg.data.max_val_images
        if 0 < size < len(self.records):
            keep = np.sort(np.random.default_rng(cfg.data.seed).choice(len(self.records), size, replace=False))
            self.subset_records = [self.records[i] for i in keep]
        self.ann_json, self.image_dir = split_paths(cfg, "val")
        self._predictor: Optional[Predictor] = None

    def predictor(self, model) -> Predictor:
        """The compiled predictor of ``model``, made once."""
        if self._predictor is None or self._predictor.model is not model:
            self._predictor = Predictor(model, self.cfg, flip=self.flip)
        return self._predictor

    def check_readable(self) -> None:
        """ValueError naming the image folder when none of the first validation pictures decodes
        (a wrong ``--val-images``), before any training step."""
        InputPipeline(self.cfg, "val", self.records).check_readable()

    def __call__(self, model, writer=None, step: int = 0, subset: bool = False) -> Dict[str, Any]:
        start = time.time()
        records = self.subset_records if subset else self.records
        predictions, pipeline = predict_records(self.predictor(model), records, self.cfg.data.batch_size)
        result = score_predictions_for(self.cfg, self.ann_json, predictions, [r.image_id for r in records])
        result["predicted_people"] = int(sum(len(p.poses) for p in predictions))
        result["eval_seconds"] = round(time.time() - start, 2)
        result["skipped_images"] = pipeline.skipped.count
        limit = self.max_skipped_fraction
        if limit is not None and pipeline.skipped.count > limit * max(1, len(records)):
            raise ValueError(f"the evaluation could not use {pipeline.skipped.count} of {len(records)} "
                             f"validation images (more than {limit:.0%}; {pipeline.skipped.summary()}): "
                             f"is the image folder {self.image_dir} right?")
        if writer is not None and self.num_pictures:
            pictures = [_draw(p, self.cfg) for p in predictions[:self.num_pictures]]
            if pictures:
                size = max(p.shape[0] for p in pictures), max(p.shape[1] for p in pictures)
                with writer.as_default(step=step):
                    tf.summary.image("val/predictions", np.stack([pad_to(p, size) for p in pictures]),
                                     max_outputs=self.num_pictures)
        return result


def evaluate_model(model, cfg: Config, flip: bool = False) -> Dict[str, Any]:
    """One-off :class:`Evaluator` run: the official score of ``model`` on the validation split."""
    return Evaluator(cfg, flip=flip, num_pictures=0)(model)


def _draw(prediction: Prediction, cfg: Config) -> np.ndarray:
    return draw_prediction(read_rgb(prediction.record.image_path), prediction, cfg.skeleton)


def save_prediction_picture(model, cfg: Config, path: str, num_images: int = 6, records: Optional[Sequence] = None,
                            predictor: Optional[Predictor] = None) -> str:
    """Predictions on the first validation images (``records``: of these; ``predictor``: this
    compiled one), tiled into one PNG at ``path``."""
    if records is None:
        records, _ = load_records(cfg, "val")
    predictor = predictor or Predictor(model, cfg)
    predictions, _ = predict_records(predictor, list(records)[:num_images], cfg.data.batch_size)
    pictures = [_draw(p, cfg) for p in predictions]
    if not pictures:
        raise ValueError("no readable validation image to draw predictions on")
    return save_rgb(path, prediction_grid(pictures))
