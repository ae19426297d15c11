"""AI Challenger 2017 keypoint annotations: validating parser, record reader and writer.

The file is a JSON list with one entry per image::

    {"image_id": "d8eedd...",                      # the image file stem (<image_id>.jpg)
     "url": "http://...",                          # optional, unused
     "human_annotations":    {"human1": [x1, y1, x2, y2], ...},
     "keypoint_annotations": {"human1": [x, y, v] * 14, ...}}

Joint order (the ``ai_challenger`` skeleton, ``config/skeletons.py``): right shoulder, elbow,
wrist; left shoulder, elbow, wrist; right hip, knee, ankle; left hip, knee, ankle; head top; neck.
Visibility ``v``: 1 visible, 2 labelled but occluded, 3 not labelled (then ``x = y = 0``); the
reader converts it to the internal convention of ``dataset/records.py``.

Two layers:

* :func:`parse_ai_challenger` validates the JSON and yields each image with its values as in the
  file (:class:`AicImage`). Anything malformed raises :class:`~dataset.errors.AnnotationError`
  naming the file, image and person. The official scorer (``utils/aic_eval.py``) reads its
  reference through this layer, because it must see every person, trainable or not.
* :func:`read_ai_challenger` / :func:`ai_challenger_records` turn that into
  :class:`~dataset.records.ImageRecord` for training, leaving out (and counting) people who cannot
  train: no labelled joint, or a box of zero width or height.

:func:`to_ai_challenger_json` writes records back in the file format (also the submission format
of the competition when ``boxes=False``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from config.skeletons import AI_CHALLENGER, Skeleton
from dataset.errors import (AnnotationError, ReaderStats, json_numbers, keypoint_value_names,
                            load_json, number_array, require_keys, where)
from dataset.records import AIC_TO_INTERNAL, INTERNAL_TO_AIC, VIS_UNLABELLED, VIS_VISIBLE, ImageRecord

logger = logging.getLogger(__name__)

AIC_VISIBLE = INTERNAL_TO_AIC[VIS_VISIBLE]         # 1: the only value the official OKS counts
AIC_UNLABELLED = INTERNAL_TO_AIC[VIS_UNLABELLED]   # 3
AIC_VISIBILITY_VALUES = tuple(sorted(AIC_TO_INTERNAL))   # (1, 2, 3)
BOX_VALUE_NAMES = ("x1", "y1", "x2", "y2")
IMAGE_EXTENSION = ".jpg"

# file visibility -> internal visibility, as an index table (entry 0 is never used: 0 is rejected)
_TO_INTERNAL = np.zeros(max(AIC_TO_INTERNAL) + 1, np.float32)
for _file_v, _internal_v in AIC_TO_INTERNAL.items():
    _TO_INTERNAL[_file_v] = _internal_v
_TO_FILE = np.array([INTERNAL_TO_AIC[v] for v in range(len(INTERNAL_TO_AIC))], np.int64)


@dataclasses.dataclass
class AicImage:
    """One validated image entry, values exactly as in the file.

    Attributes:
        image_id: the entry's ``image_id``.
        person_names: keys of ``keypoint_annotations`` in file order (``human1``...).
        keypoints: float64 [N, J, 3]: x, y and the file's visibility (1, 2, 3).
        boxes: float64 [N, 4]: x1, y1, x2, y2 from ``human_annotations`` under the same keys.
    """
    image_id: str
    person_names: List[str]
    keypoints: np.ndarray
    boxes: np.ndarray


def parse_ai_challenger(data: Any, source: str, skeleton: Skeleton = AI_CHALLENGER) -> Iterator[AicImage]:
    """Validate AI Challenger JSON (already parsed) image by image.

    Args:
        data: the parsed JSON: a list of image entries.
        source: what to call ``data`` in error messages (the file path).
        skeleton: the joint layout of the keypoint lists (3 values per joint).

    Raises AnnotationError for: a top level that is not a list; an entry that is not an object or
    lacks ``image_id``, ``human_annotations`` or ``keypoint_annotations``; an image id that is not
    a non-empty string or appears twice; a person with keypoints but no box or the reverse; a
    keypoint list that is not ``3 * J`` numbers, a box that is not 4 numbers; a non-numeric, NaN
    or infinite value; a visibility outside {1, 2, 3}; a negative coordinate on a labelled joint;
    a box with ``x2 < x1`` or ``y2 < y1``.
    """
    if not isinstance(data, list):
        raise AnnotationError(f"{source}: an AI Challenger file is a JSON list of images, "
                              f"got a JSON {type(data).__name__}")
    first_seen = {}
    for index, entry in enumerate(data):
        image = _parse_entry(entry, index, source, skeleton)
        if image.image_id in first_seen:
            raise AnnotationError(f"{where(source, image.image_id)}: duplicate image id "
                                  f"(entries {first_seen[image.image_id]} and {index})")
        first_seen[image.image_id] = index
        yield image


def _parse_entry(entry: Any, index: int, source: str, skeleton: Skeleton) -> AicImage:
    require_keys(entry, ("image_id", "human_annotations", "keypoint_annotations"),
                 where(source, index=index))
    image_id = entry["image_id"]
    if not isinstance(image_id, str) or not image_id:
        raise AnnotationError(f"{where(source, index=index)}: 'image_id' must be a non-empty "
                              f"string, got {image_id!r}")
    keypoint_annos, human_annos = entry["keypoint_annotations"], entry["human_annotations"]
    for key, value in (("keypoint_annotations", keypoint_annos), ("human_annotations", human_annos)):
        if not isinstance(value, dict):
            raise AnnotationError(f"{where(source, image_id)}: {key!r} must be an object "
                                  f"{{\"humanN\": [...]}}, got {type(value).__name__}")
    names = list(keypoint_annos)
    for name in names:
        if name not in human_annos:
            raise AnnotationError(f"{where(source, image_id, name)}: has keypoints but no box in "
                                  f"'human_annotations'")
    if len(human_annos) != len(names):
        name = next(n for n in human_annos if n not in keypoint_annos)
        raise AnnotationError(f"{where(source, image_id, name)}: has a box but no keypoints in "
                              f"'keypoint_annotations'")

    num_joints = skeleton.num_joints
    keypoints = np.empty((len(names), 3 * num_joints), np.float64)
    boxes = np.empty((len(names), 4), np.float64)
    value_names = keypoint_value_names(skeleton.joint_names)
    for i, name in enumerate(names):
        keypoints[i] = number_array(keypoint_annos[name], 3 * num_joints,
                                    f"{where(source, image_id, name)}: keypoints", value_names)
        boxes[i] = number_array(human_annos[name], 4, f"{where(source, image_id, name)}: box",
                                BOX_VALUE_NAMES)
    keypoints = keypoints.reshape(len(names), num_joints, 3)
    _check_values(keypoints, boxes, names, source, image_id, skeleton)
    return AicImage(image_id, names, keypoints, boxes)


def _check_values(keypoints: np.ndarray, boxes: np.ndarray, names: Sequence[str], source: str,
                  image_id: str, skeleton: Skeleton) -> None:
    """Visibility set, non-negative labelled coordinates and box order, checked as arrays."""
    vis = keypoints[..., 2]
    bad = ~np.isin(vis, AIC_VISIBILITY_VALUES)
    if bad.any():
        n, j = np.argwhere(bad)[0]
        raise AnnotationError(f"{where(source, image_id, names[n])}: {skeleton.joint_names[j]} has "
                              f"visibility {vis[n, j]:g}; AI Challenger uses 1 (visible), "
                              f"2 (occluded), 3 (not labelled)")
    bad = (vis != AIC_UNLABELLED) & (keypoints[..., :2] < 0).any(axis=-1)
    if bad.any():
        n, j = np.argwhere(bad)[0]
        raise AnnotationError(f"{where(source, image_id, names[n])}: labelled joint "
                              f"{skeleton.joint_names[j]} has a negative coordinate "
                              f"({keypoints[n, j, 0]:g}, {keypoints[n, j, 1]:g})")
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        n = int(np.flatnonzero(bad)[0])
        raise AnnotationError(f"{where(source, image_id, names[n])}: box "
                              f"{json_numbers(boxes[n])} has x2 < x1 or y2 < y1")


def ai_challenger_records(data: Any, source: str, image_dir: Optional[str] = None,
                          skeleton: Skeleton = AI_CHALLENGER) -> Tuple[List[ImageRecord], ReaderStats]:
    """Records of parsed AI Challenger JSON (see :func:`read_ai_challenger`)."""
    stats = ReaderStats(source=source)
    records = []
    for image in parse_ai_challenger(data, source, skeleton):
        records.append(_to_record(image, image_dir, stats))
    return records, stats


def read_ai_challenger(json_path: str, image_dir: Optional[str] = None,
                       skeleton: Skeleton = AI_CHALLENGER) -> Tuple[List[ImageRecord], ReaderStats]:
    """Read an AI Challenger keypoint file into records.

    Args:
        json_path: the annotation file.
        image_dir: folder of the images; ``image_path`` is ``image_dir/<image_id>.jpg`` (not
            opened here: the pipeline reads the image and its size). None leaves it unset.
        skeleton: joint layout of the file.

    Returns the records in file order and the statistics of what was kept and left out (also
    logged at INFO). Every image is kept, even one left with nobody: it teaches background.

    Raises AnnotationError for a malformed file (see :func:`parse_ai_challenger`).
    """
    records, stats = ai_challenger_records(load_json(json_path), json_path, image_dir, skeleton)
    logger.info(stats.summary())
    return records, stats


def _to_record(image: AicImage, image_dir: Optional[str], stats: ReaderStats) -> ImageRecord:
    """Internal visibility, unlabelled joints zeroed, untrainable people left out and counted."""
    vis = _TO_INTERNAL[image.keypoints[..., 2].astype(np.intp)]
    labelled = vis > VIS_UNLABELLED
    xy = np.where(labelled[..., None], image.keypoints[..., :2], 0.0)
    no_joint = ~labelled.any(axis=1)
    boxes = image.boxes
    zero_box = ((boxes[:, 2] == boxes[:, 0]) | (boxes[:, 3] == boxes[:, 1])) & ~no_joint
    stats.drop_people("no labelled joint", no_joint.sum())
    stats.drop_people("zero-size box", zero_box.sum())
    keep = np.flatnonzero(~(no_joint | zero_box))
    stats.images += 1
    stats.people += len(keep)
    stats.empty_images += int(len(keep) == 0)
    return ImageRecord(
        image_id=image.image_id,
        image_path=os.path.join(image_dir, image.image_id + IMAGE_EXTENSION) if image_dir else None,
        keypoints=np.concatenate([xy, vis[..., None]], axis=-1)[keep].astype(np.float32),
        boxes=boxes[keep].astype(np.float32),
        person_names=[image.person_names[i] for i in keep],
    )


def to_ai_challenger_json(records: Sequence[ImageRecord], boxes: bool = True) -> List[dict]:
    """Records in the AI Challenger file format (visibility converted back, unlabelled = 0, 0, 3).

    Args:
        records: images; ``person_names`` become the person keys (``human1``... by convention).
        boxes: write ``human_annotations`` (an annotation file); False writes only image ids and
            keypoints, the competition's submission format.
    """
    entries = []
    for record in records:
        vis = record.keypoints[..., 2].astype(np.int64)
        labelled = vis > VIS_UNLABELLED
        xy = np.where(labelled[..., None], record.keypoints[..., :2], 0.0)
        file_vis = _TO_FILE[vis]
        keypoint_annos = {}
        for name, person_xy, person_vis in zip(record.person_names, xy, file_vis):
            values = json_numbers(np.concatenate([person_xy, np.zeros_like(person_xy[:, :1])], 1).ravel())
            values[2::3] = person_vis.tolist()
            keypoint_annos[name] = values
        entry = {"image_id": record.image_id}
        if boxes:
            entry["human_annotations"] = dict(zip(record.person_names, json_numbers(record.boxes)))
        entry["keypoint_annotations"] = keypoint_annos
        entries.append(entry)
    return entries
