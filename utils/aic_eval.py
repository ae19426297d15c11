"""The official AI Challenger 2017 keypoint score, vectorised.

Reproduces ``Evaluation/keypoint_eval/keypoint_eval.py`` of the AIChallenger/AI_Challenger_2017
repository (Python 2) to floating-point rounding, with one [G, P, 14] array per image instead of
its per-person loops. Its definition:

* OKS of ground-truth person ``i`` and predicted person ``j`` of one image, over the joints that
  are *visible* in the ground truth (file value ``v == 1``; occluded joints do not count)::

      oks[i, j] = mean_k exp(-d_ijk^2 / 2 / delta_k^2 / (scale_i + 1))
      delta = 2 * sigma (sigmas: config.skeletons.AI_CHALLENGER.oks_sigmas)
      scale_i = float32((y2 - y1) * (x2 - x1)) of the person's box

  A ground-truth person with no visible joint has OKS 0 against every prediction.
  (The official script adds 1 to the float32 scale in float64, as legacy NumPy did; so do we.)
* Each ground-truth person takes its best OKS over the image's predictions (several ground-truth
  people may take the same prediction: there is no one-to-one matching), and the image adds
  ``max(G, P)`` to the denominator: unmatched predictions cost as much as missed people.
  An image with no prediction entry adds G zeros and G to the denominator.
* ``score = mean over t in linspace(0.5, 0.95, 10) of count(oks > t) / float32(denominator)``.

Predictions: entries without ``image_id`` or ``keypoint_annotations`` are skipped with a
warning; ``image_id`` is cut at the first ``.`` (``abc.jpg`` -> ``abc``); when an id repeats, the
last entry wins and a warning says so. Prediction visibility values are ignored; predictions of
images not in the reference are ignored.

Where the official script crashes, this module behaves as documented here instead:

* an ``image_id`` with a suffix (``abc.jpg``): the official script stores the prediction under the
  unstripped id and then fails to find it; here it is matched to reference image ``abc``.
* an image with neither people nor predictions (G = P = 0): the official script fails on an empty
  maximum; here it adds nothing.
* a malformed prediction (not an object, ``image_id`` not a string, ``keypoint_annotations`` not
  an object, a person that is not 42 finite numbers), a file that is not JSON or not a list, or a
  malformed reference: :class:`~dataset.errors.AnnotationError` naming the file, the image id
  and the person.
* nothing to score (all denominators 0): score 0 with a warning (the official divides 0 by 0).

Warnings keep the official wording, except that the missing-``image_id`` message loses the run of
spaces a line continuation put into the official string.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from config.skeletons import AI_CHALLENGER
from dataset.ai_challenger import parse_ai_challenger
from dataset.records import AIC_VISIBILITY, ReadStats
from dataset.errors import (AnnotationError, keypoint_value_names, load_json, number_rows, settle_person_problems,
                            where)

THRESHOLDS = np.linspace(0.5, 0.95, 10)
DELTA = 2 * np.array(AI_CHALLENGER.oks_sigmas, np.float64)
NUM_JOINTS = AI_CHALLENGER.num_joints
_VALUE_NAMES = keypoint_value_names(AI_CHALLENGER.joint_names)


@dataclasses.dataclass(frozen=True)
class _ReferenceImage:
    xy: np.ndarray               # float64 [G, J, 2]
    visible: np.ndarray          # bool [G, J]: file visibility == 1
    scale_plus_one: np.ndarray   # float64 [G]: float64(float32(box area)) + 1


@dataclasses.dataclass(frozen=True)
class AicReference:
    """A validated reference, ready to score many submissions against (e.g. every epoch)."""
    images: Dict[str, _ReferenceImage]
    source: str

    @property
    def num_people(self) -> int:
        return sum(len(im.xy) for im in self.images.values())


@dataclasses.dataclass
class AicScore:
    """The result of :func:`score_predictions`.

    Attributes:
        score: the official score, mean of ``ap`` over the ten OKS thresholds.
        ap: ``count(oks > t) / denominator`` for each t in ``thresholds``.
        thresholds: 0.5, 0.55, ..., 0.95.
        oks: float64 [people]: each reference person's best OKS (0 when missed), in reference
            order (the official ``oks_all``).
        denominator: sum over images of max(G, P) (G for images without a prediction).
        num_images, num_people: size of the reference.
        num_missing_images: reference images without a prediction entry.
        num_extra_images: predicted images not in the reference (ignored).
        warnings: the official script's warnings, in order.
    """
    score: float
    ap: Tuple[float, ...]
    thresholds: Tuple[float, ...]
    oks: np.ndarray
    denominator: int
    num_images: int
    num_people: int
    num_missing_images: int
    num_extra_images: int
    warnings: List[str]


def load_reference(ref: Union[List[Any], AicReference], source: str = "reference") -> AicReference:
    """Validate an AI Challenger annotation list (parsed JSON) for scoring.

    Every person counts, trainable or not (unlike the training reader): the official score
    counts them, and it accepts what the official script accepts: a negative coordinate, a
    visibility other than 1 (only 1 counts), an inverted box (its area, as the official computes
    it). Raises AnnotationError for malformed structure (see
    ``dataset.ai_challenger.parse_ai_challenger``) and for a NaN or infinite value, which would
    make the official score NaN.
    """
    if isinstance(ref, AicReference):
        return ref
    annotations = parse_ai_challenger(ref, source, AI_CHALLENGER)
    settle_person_problems([p for p in annotations.problems if p.reason.startswith("non-finite")],
                           len(annotations.person_names), ReadStats(source), strict=True)
    boxes = annotations.boxes
    scale = ((boxes[:, 3] - boxes[:, 1]) * (boxes[:, 2] - boxes[:, 0])).astype(np.float32)
    scale_plus_one = scale.astype(np.float64) + 1
    xy = annotations.keypoints[..., :2]
    visible = annotations.keypoints[..., 2] == AIC_VISIBILITY.visible
    images = {}
    for i, image_id in enumerate(annotations.image_ids):
        rows = annotations.people(i)
        images[image_id] = _ReferenceImage(xy[rows], visible[rows], scale_plus_one[rows])
    return AicReference(images, source)


def load_predictions(submit: Any, source: str = "submission") -> Tuple[Dict[str, np.ndarray], List[str]]:
    """``{image_id: float64 [P, 14, 2]}`` of a submission list (parsed JSON), and the warnings.

    Ids are cut at the first ``.``; for a repeated id the last entry wins. See the module
    docstring for what is skipped with a warning and what raises AnnotationError.
    """
    if not isinstance(submit, list):
        raise AnnotationError(f"{source}: a submission is a JSON list of images, got a JSON "
                              f"{type(submit).__name__}")
    predictions: Dict[str, np.ndarray] = {}
    warnings: List[str] = []
    for index, entry in enumerate(submit):
        if not isinstance(entry, dict):
            raise AnnotationError(f"{where(source, index=index)}: expected an object with "
                                  f"'image_id' and 'keypoint_annotations', got {type(entry).__name__}")
        if "image_id" not in entry:
            warnings.append("There is an invalid annotation info, likely missing key 'image_id'.")
            continue
        raw_id = entry["image_id"]
        if not isinstance(raw_id, str):
            raise AnnotationError(f"{where(source, index=index)}: 'image_id' must be a string, "
                                  f"got {raw_id!r}")
        if "keypoint_annotations" not in entry:
            warnings.append(raw_id + " does not have key 'keypoint_annotations'.")
            continue
        people = entry["keypoint_annotations"]
        if not isinstance(people, dict):
            raise AnnotationError(f"{where(source, raw_id)}: 'keypoint_annotations' must be an object "
                                  f"{{\"humanN\": [x, y, v] * {NUM_JOINTS}}}, got {type(people).__name__}")
        names = list(people)
        values = number_rows(list(people.values()), 3 * NUM_JOINTS,
                             lambda i: f"{where(source, raw_id, names[i])}: keypoints", _VALUE_NAMES)
        xy = values.reshape(len(names), NUM_JOINTS, 3)
        image_id = raw_id.split(".")[0]
        if image_id in predictions:
            warnings.append(raw_id + " is duplicated in prediction JSON file.")
        predictions[image_id] = xy[..., :2]
    return predictions, warnings


def image_oks(ref: _ReferenceImage, pred_xy: np.ndarray) -> np.ndarray:
    """float64 [G, P]: OKS of every reference person against every prediction of one image."""
    d2 = np.sum((ref.xy[:, None] - pred_xy[None]) ** 2, axis=-1)                # [G, P, J]
    e = np.exp(-d2 / 2 / DELTA ** 2 / ref.scale_plus_one[:, None, None])
    num_visible = ref.visible.sum(axis=1)                                       # [G]
    total = np.sum(e, axis=-1, where=ref.visible[:, None, :])
    return total / np.maximum(num_visible, 1)[:, None]                          # 0 when none visible


def score_predictions(ref: Union[List[Any], AicReference], submit: Any,
                      ref_source: str = "reference", submit_source: str = "submission") -> AicScore:
    """The official AI Challenger keypoint score of ``submit`` against ``ref``.

    Args:
        ref: the reference annotation list (parsed JSON) or a :func:`load_reference` result.
        submit: the submission list (parsed JSON): ``[{"image_id", "keypoint_annotations":
            {"humanN": [x, y, v] * 14}}, ...]``.
        ref_source, submit_source: names used in error messages (the file paths).

    Raises AnnotationError for malformed input.
    """
    reference = load_reference(ref, ref_source)
    predictions, warnings = load_predictions(submit, submit_source)
    oks_all: List[np.ndarray] = []
    denominator = 0
    missing = 0
    for image_id, image in reference.images.items():
        num_gt = len(image.xy)
        pred_xy = predictions.get(image_id)
        if pred_xy is None:
            warnings.append(image_id + " is not in the prediction JSON file.")
            oks_all.append(np.zeros(num_gt))
            denominator += num_gt
            missing += 1
        elif len(pred_xy) == 0:
            denominator += num_gt   # the official max over an empty axis appends nothing
        else:
            if num_gt:
                oks_all.append(np.max(image_oks(image, pred_xy), axis=1))
            denominator += max(num_gt, len(pred_xy))
    oks = np.concatenate(oks_all) if oks_all else np.zeros(0)
    if denominator == 0:
        warnings.append("Nothing to score: the reference has no people and there are no predictions "
                        "of its images; the score is 0.")
        ap = [0.0] * len(THRESHOLDS)
    else:
        ap = [np.sum(oks > t) / np.float32(denominator) for t in THRESHOLDS]
    return AicScore(
        score=float(np.mean(ap)), ap=tuple(float(a) for a in ap),
        thresholds=tuple(float(t) for t in THRESHOLDS), oks=oks, denominator=int(denominator),
        num_images=len(reference.images), num_people=reference.num_people,
        num_missing_images=missing,
        num_extra_images=len(set(predictions) - set(reference.images)), warnings=warnings)


def evaluate_files(ref_path: str, submit_path: str) -> AicScore:
    """Score the submission file ``submit_path`` against the annotation file ``ref_path``."""
    return score_predictions(load_json(ref_path), load_json(submit_path), ref_path, submit_path)


def format_warnings(warnings: Sequence[str], limit: Optional[int] = 20) -> List[str]:
    """The warnings one per line, at most ``limit`` of them and a count of the rest."""
    if limit is None or len(warnings) <= limit:
        return list(warnings)
    return list(warnings[:limit]) + [f"... and {len(warnings) - limit} more warnings"]
