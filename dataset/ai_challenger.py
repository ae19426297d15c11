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

* :func:`parse_ai_challenger` validates the JSON and returns its values as in the file, the
  people of all images stacked (:class:`AicAnnotations`), so that the checks are a few NumPy
  operations over the whole file (AI Challenger train: 210k images, 380k people). Anything
  malformed raises :class:`~dataset.errors.AnnotationError` naming the file, image and person.
  The official scorer (``utils/aic_eval.py``) reads its reference through this layer, because it
  must see every person, trainable or not.
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
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from config.skeletons import AI_CHALLENGER, Skeleton
from config.skeletons import VIS_UNLABELLED
from dataset.errors import (AnnotationError, PersonProblem, box_problems, json_numbers, keypoint_lists,
                            keypoint_problems, keypoint_value_names, load_json, number_rows, require_keys,
                            settle_person_problems, where)
from dataset.records import AIC_VISIBILITY, ImageRecord, ReadStats, box_region

logger = logging.getLogger(__name__)

BOX_VALUE_NAMES = ("x1", "y1", "x2", "y2")
IMAGE_EXTENSION = ".jpg"



@dataclasses.dataclass
class AicAnnotations:
    """A validated AI Challenger file, values exactly as in the file, people of all images stacked.

    The people of image ``i`` are rows ``offsets[i]:offsets[i + 1]`` (:meth:`people`), so that
    checks and conversions run as a few NumPy operations over the whole file.

    Attributes:
        image_ids: the entries' ``image_id`` in file order.
        person_names: keys of ``keypoint_annotations`` (``human1``...), image by image, in file order.
        keypoints: float64 [people, J, 3]: x, y and the file's visibility (1, 2, 3 when valid).
        boxes: float64 [people, 4]: x1, y1, x2, y2 from ``human_annotations`` under the same keys.
        offsets: int64 [images + 1].
        problems: the people with bad values (:class:`dataset.errors.PersonProblem`), for the
            caller to settle (drop or raise).
    """
    image_ids: List[str]
    person_names: List[str]
    keypoints: np.ndarray
    boxes: np.ndarray
    offsets: np.ndarray
    problems: List[PersonProblem]

    def people(self, i: int) -> slice:
        """The rows of image ``i``."""
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))


def parse_ai_challenger(data: Any, source: str, skeleton: Skeleton = AI_CHALLENGER) -> AicAnnotations:
    """Validate AI Challenger JSON (already parsed).

    Args:
        data: the parsed JSON: a list of image entries.
        source: what to call ``data`` in error messages (the file path).
        skeleton: the joint layout of the keypoint lists (3 values per joint).

    Raises AnnotationError for problems of structure: a top level that is not a list; an entry
    that is not an object or lacks ``image_id``, ``human_annotations`` or
    ``keypoint_annotations``; an image id that is not a non-empty string or appears twice; a
    person with keypoints but no box or the reverse; a keypoint list that is not ``3 * J``
    numbers, a box that is not 4 numbers; a non-numeric value. Problems of one person's values (a
    NaN or infinite value, a visibility outside {1, 2, 3}, a negative coordinate on a labelled
    joint, a box with ``x2 < x1`` or ``y2 < y1``) are returned in ``problems``.
    """
    if not isinstance(data, list):
        raise AnnotationError(f"{source}: an AI Challenger file is a JSON list of images, "
                              f"got a JSON {type(data).__name__}")
    image_ids, names, counts, keypoint_rows, box_rows = [], [], [], [], []
    first_seen = {}
    for index, entry in enumerate(data):
        image_id, keypoint_annos, human_annos = _check_entry(entry, index, source)
        if image_id in first_seen:
            raise AnnotationError(f"{where(source, image_id)}: duplicate image id "
                                  f"(entries {first_seen[image_id]} and {index})")
        first_seen[image_id] = index
        image_ids.append(image_id)
        names.extend(keypoint_annos)
        counts.append(len(keypoint_annos))
        keypoint_rows.extend(keypoint_annos.values())
        box_rows.extend(human_annos[n] for n in keypoint_annos)

    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    owner = np.repeat(np.arange(len(image_ids)), counts)

    def person(row: int) -> str:
        return where(source, image_ids[owner[row]], names[row])

    num_joints = skeleton.num_joints
    keypoints = number_rows(keypoint_rows, 3 * num_joints, lambda r: f"{person(r)}: keypoints",
                            keypoint_value_names(skeleton.joint_names), finite=False)
    keypoints = keypoints.reshape(len(names), num_joints, 3)
    boxes = number_rows(box_rows, 4, lambda r: f"{person(r)}: box", BOX_VALUE_NAMES, finite=False)
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    problems = (keypoint_problems(keypoints, person, skeleton, AIC_VISIBILITY) +
                box_problems(boxes, BOX_VALUE_NAMES, inverted, "x2 < x1 or y2 < y1 (a negative width or height)",
                             person))
    return AicAnnotations(image_ids, names, keypoints, boxes, offsets, problems)


def _check_entry(entry: Any, index: int, source: str) -> Tuple[str, dict, dict]:
    """The layout of one image entry: (image_id, keypoint_annotations, human_annotations)."""
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
    if keypoint_annos.keys() != human_annos.keys():
        name = next((n for n in keypoint_annos if n not in human_annos), None)
        if name is not None:
            raise AnnotationError(f"{where(source, image_id, name)}: has keypoints but no box in "
                                  f"'human_annotations'")
        name = next(n for n in human_annos if n not in keypoint_annos)
        raise AnnotationError(f"{where(source, image_id, name)}: has a box but no keypoints in "
                              f"'keypoint_annotations'")
    return image_id, keypoint_annos, human_annos


def ai_challenger_records(data: Any, source: str, image_dir: Optional[str] = None,
                          skeleton: Skeleton = AI_CHALLENGER,
                          strict: bool = False) -> Tuple[List[ImageRecord], ReadStats]:
    """Records of parsed AI Challenger JSON (see :func:`read_ai_challenger`).

    Internal visibility; unlabelled joints zeroed; people with no labelled joint or a box of zero
    width or height left out and counted. People with bad values are dropped, counted by reason
    and named in the log (``strict``: AnnotationError); the box of such a person, when finite,
    becomes an ignore region of the image, so that the person is not taught as background. The
    records' arrays are slices of two arrays for the whole file (no copy per image).
    """
    annotations = parse_ai_challenger(data, source, skeleton)
    stats = ReadStats(source=source)
    good = settle_person_problems(annotations.problems, len(annotations.person_names), stats, strict)
    file_vis = np.where(good[:, None], annotations.keypoints[..., 2], AIC_VISIBILITY.unlabelled)
    vis = AIC_VISIBILITY.to_internal(file_vis)
    labelled = vis > VIS_UNLABELLED
    keypoints = np.concatenate([np.where(labelled[..., None], annotations.keypoints[..., :2], 0.0),
                                vis[..., None]], axis=-1).astype(np.float32)
    boxes = annotations.boxes
    no_joint = ~labelled.any(axis=1) & good
    zero_box = ((boxes[:, 2] == boxes[:, 0]) | (boxes[:, 3] == boxes[:, 1])) & ~no_joint & good
    keep = ~(no_joint | zero_box) & good
    owner = np.repeat(np.arange(len(annotations.image_ids)), np.diff(annotations.offsets))
    ignore_regions: List[List[Any]] = [[] for _ in annotations.image_ids]
    for row in np.flatnonzero(~good & np.isfinite(boxes).all(axis=1)):
        ignore_regions[owner[row]].append(box_region(*boxes[row]))

    stats.drop_people("no labelled joint", no_joint.sum())
    stats.drop_people("zero-size box", zero_box.sum())
    # the kept people, still image by image: image i owns rows kept_offsets[i]:kept_offsets[i + 1]
    keypoints, boxes = keypoints[keep], boxes[keep].astype(np.float32)
    names = [n for n, k in zip(annotations.person_names, keep.tolist()) if k]
    kept_offsets = np.concatenate([[0], np.cumsum(keep)])[annotations.offsets].tolist()
    records = []
    for i, (image_id, start, stop) in enumerate(zip(annotations.image_ids, kept_offsets[:-1], kept_offsets[1:])):
        records.append(ImageRecord(
            image_id=image_id,
            image_path=os.path.join(image_dir, image_id + IMAGE_EXTENSION) if image_dir else None,
            keypoints=keypoints[start:stop],
            boxes=boxes[start:stop],
            person_names=names[start:stop],
            ignore_regions=ignore_regions[i]))
    stats.images = len(records)
    stats.people = len(names)
    stats.empty_images = sum(r.num_people == 0 for r in records)
    return records, stats


def read_ai_challenger(json_path: str, image_dir: Optional[str] = None, skeleton: Skeleton = AI_CHALLENGER,
                       strict: bool = False) -> Tuple[List[ImageRecord], ReadStats]:
    """Read an AI Challenger keypoint file into records.

    Args:
        json_path: the annotation file.
        image_dir: folder of the images; ``image_path`` is ``image_dir/<image_id>.jpg`` (not
            opened here: the pipeline reads the image and its size). None leaves it unset.
        skeleton: joint layout of the file.
        strict: a person with bad values raises instead of being dropped and counted.

    Returns the records in file order and the statistics of what was kept and left out (also
    logged at INFO). Every image is kept, even one left with nobody: it teaches background.

    Raises AnnotationError for a malformed file (see :func:`parse_ai_challenger`).
    """
    records, stats = ai_challenger_records(load_json(json_path), json_path, image_dir, skeleton, strict)
    logger.info(stats.summary())
    return records, stats


def to_ai_challenger_json(records: Sequence[ImageRecord], boxes: bool = True) -> List[dict]:
    """Records in the AI Challenger file format (visibility converted back, unlabelled = 0, 0, 3).

    Args:
        records: images; ``person_names`` become the person keys (``human1``... by convention).
        boxes: write ``human_annotations`` (an annotation file); False writes only image ids and
            keypoints, the competition's submission format.
    """
    if not records:
        return []
    keypoints = keypoint_lists(np.concatenate([r.keypoints for r in records]), AIC_VISIBILITY)
    all_boxes = json_numbers(np.concatenate([r.boxes for r in records]))
    entries, start = [], 0
    for record in records:
        stop = start + record.num_people
        entry = {"image_id": record.image_id}
        if boxes:
            entry["human_annotations"] = dict(zip(record.person_names, all_boxes[start:stop]))
        entry["keypoint_annotations"] = dict(zip(record.person_names, keypoints[start:stop]))
        entries.append(entry)
        start = stop
    return entries
