"""COCO person keypoints: validating record reader (through pycocotools) and writer.

The file is a JSON object::

    {"images":      [{"id": 397133, "file_name": "000000397133.jpg", "width": 640, "height": 427}, ...],
     "annotations": [{"id": 1, "image_id": 397133, "category_id": 1, "iscrowd": 0,
                      "bbox": [x, y, w, h], "keypoints": [x, y, v] * 17, "num_keypoints": 15,
                      "segmentation": [[x, y, ...]] or RLE, "area": ...}, ...],
     "categories":  [{"id": 1, "name": "person", "keypoints": ["nose", ...], ...}]}

Joint order (the ``coco`` skeleton, ``config/skeletons.py``): nose, left eye, right eye, left ear,
right ear, left/right shoulder, left/right elbow, left/right wrist, left/right hip, left/right knee,
left/right ankle. Visibility ``v``: 0 not labelled, 1 labelled but occluded, 2 visible; the reader
converts it to the internal convention of ``dataset/records.py``.

Who is a person of a record: a non-crowd annotation of the person category with at least one
labelled joint and a box of non-zero size. Crowd annotations and keypoint-less people are not
people (no root peak), but they are there in the image: their ``segmentation`` goes to
``ImageRecord.ignore_regions`` so the pipeline can leave their pixels out of the root-map loss
(HigherHRNet's practice). When such an annotation has no segmentation, its box, as a polygon,
stands in.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
from pycocotools.coco import COCO as CocoIndex

from config.config import DERIVED_SKELETONS
from config.skeletons import COCO, SKELETONS, Skeleton, derive_skeleton
from config.skeletons import VIS_UNLABELLED
from dataset.errors import (AnnotationError, box_problems, json_numbers, keypoint_lists, keypoint_problems,
                            keypoint_value_names, load_json, number_rows, require_keys, settle_person_problems,
                            where)
from dataset.records import COCO_VISIBILITY, ImageRecord, ReadStats, box_region

logger = logging.getLogger(__name__)

PERSON_CATEGORY = "person"
BBOX_VALUE_NAMES = ("x", "y", "width", "height")



def read_coco(json_path: str, image_dir: Optional[str] = None, skeleton: Skeleton = COCO,
              strict: bool = False, keep_empty: bool = True) -> Tuple[List[ImageRecord], ReadStats]:
    """Read a COCO person-keypoints file into records, one per entry of ``images``.

    Args:
        json_path: the annotation file (e.g. ``person_keypoints_train2017.json``).
        image_dir: folder of the images; ``image_path`` is ``image_dir/<file_name>``. None leaves
            it unset.
        skeleton: joint layout; the category's ``keypoints`` names, when given, must match it.
        strict: an annotation with bad values raises instead of being dropped and counted.
        keep_empty: keep images without a person of the record (False for training: about 54k
            of train2017's 118k images, which HigherHRNet, DEKR and CenterNet leave out).

    Returns the records (in the order of ``images``) and the statistics of what was kept and left
    out (also logged at INFO). Width and height come from the ``images`` entry.

    Raises AnnotationError for a malformed file (see :func:`coco_records`).
    """
    records, stats = coco_records(load_json(json_path), json_path, image_dir, skeleton, strict)
    if not keep_empty:
        kept = [r for r in records if r.num_people]
        for _ in range(len(records) - len(kept)):
            stats.drop_image("no person to train on")
        stats.images, stats.empty_images, records = len(kept), 0, kept
    logger.info(stats.summary())
    return records, stats


def coco_records(data: Any, source: str, image_dir: Optional[str] = None,
                 skeleton: Skeleton = COCO, strict: bool = False) -> Tuple[List[ImageRecord], ReadStats]:
    """Records of parsed COCO JSON.

    Raises AnnotationError naming the file, image and annotation for: a top level that is not an
    object with ``images``, ``annotations`` and ``categories`` lists; no person category, or one
    whose keypoint names differ from the skeleton; an image without ``id``, ``width`` or
    ``height`` (or ``file_name`` when ``image_dir`` is given), or with a size that is not
    positive; duplicate image or annotation ids; an annotation of an unknown image; a person
    annotation without ``bbox`` (or ``keypoints`` when not a crowd); a bbox that is not
    4 numbers; a keypoint list that is not ``3 * J`` numbers; a non-numeric value. An annotation
    with bad values (a NaN or infinite value, a bbox with a negative width or height, a
    visibility outside {0, 1, 2}, a negative coordinate on a labelled joint) is dropped, counted
    by reason and named in the log (``strict``: AnnotationError); a person's box, when finite,
    becomes an ignore region.
    """
    person_categories = _check_structure(data, source, skeleton, need_file_name=image_dir is not None)
    index = CocoIndex()
    index.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):   # createIndex prints progress
        index.createIndex()

    images = data["images"]
    anns, owner = _person_annotations(images, index, person_categories)

    def label(row: int) -> str:
        return _where(source, images[owner[row]]["id"], anns[row]["id"])

    crowd, xywh = _read_boxes(anns, label)
    people = np.flatnonzero(~crowd)               # rows of anns that may be people of the record
    person_label = lambda k: label(people[k])     # noqa: E731
    keypoints = _read_keypoints([anns[row] for row in people], person_label, skeleton)
    stats = ReadStats(source=source)
    # a crowd region needs a finite box; a person needs finite, valid values
    crowd_box = box_problems(xywh, BBOX_VALUE_NAMES, (xywh[:, 2:] < 0).any(axis=1), "a negative width or height",
                             label)[0]
    crowd_box.mask &= crowd
    crowd_ok = settle_person_problems([crowd_box], len(anns), stats, strict)
    good = settle_person_problems(
        keypoint_problems(keypoints, person_label, skeleton, COCO_VISIBILITY) +
        box_problems(xywh[people], BBOX_VALUE_NAMES, (xywh[people, 2:] < 0).any(axis=1),
                     "a negative width or height", person_label),
        len(people), stats, strict)
    crowd = crowd & crowd_ok
    keypoints[~good, :, 2] = COCO_VISIBILITY.unlabelled

    vis = COCO_VISIBILITY.to_internal(keypoints[..., 2])
    labelled = vis > VIS_UNLABELLED
    keypoints = np.concatenate([np.where(labelled[..., None], keypoints[..., :2], 0.0),
                                vis[..., None]], axis=-1).astype(np.float32)
    boxes = np.concatenate([xywh[people, :2], xywh[people, :2] + xywh[people, 2:]], axis=1)
    no_joint = ~labelled.any(axis=1) & good
    zero_box = (xywh[people, 2:] == 0).any(axis=1) & ~no_joint & good
    keep = ~(no_joint | zero_box) & good

    ignore_regions: List[List[Any]] = [[] for _ in images]
    for row in np.concatenate([np.flatnonzero(crowd), people[no_joint]]):
        ignore_regions[owner[row]].append(_region(anns[row], xywh[row]))
    for row in people[~good & np.isfinite(xywh[people]).all(axis=1)]:
        x, y, w, h = xywh[row]
        ignore_regions[owner[row]].append(box_region(x, y, x + w, y + h))

    stats.drop_people("crowd (ignore region)", crowd.sum())
    stats.drop_people("no labelled joint (ignore region)", no_joint.sum())
    stats.drop_people("zero-size box", zero_box.sum())
    # the kept people, still image by image: image i owns rows offsets[i]:offsets[i + 1]
    kept_rows = people[keep]
    keypoints, boxes = keypoints[keep], boxes[keep].astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(owner[kept_rows], minlength=len(images)))]).tolist()
    records = []
    for i, image in enumerate(images):
        rows = slice(offsets[i], offsets[i + 1])
        records.append(ImageRecord(
            image_id=str(image["id"]),
            image_path=os.path.join(image_dir, image["file_name"]) if image_dir else None,
            keypoints=keypoints[rows],
            boxes=boxes[rows],
            person_names=[str(anns[row]["id"]) for row in kept_rows[rows]],
            width=image["width"],
            height=image["height"],
            ignore_regions=ignore_regions[i]))
    stats.images = len(records)
    stats.people = len(kept_rows)
    stats.empty_images = sum(r.num_people == 0 for r in records)
    return records, stats


def _person_annotations(images: Sequence[Dict[str, Any]], index: CocoIndex,
                        person_categories: Set[Any]) -> Tuple[List[Dict[str, Any]], np.ndarray]:
    """The annotations of the person categories, image by image, and the image index of each."""
    anns, owner = [], []
    for i, image in enumerate(images):
        for ann in index.imgToAnns.get(image["id"], ()):
            if ann["category_id"] in person_categories:
                anns.append(ann)
                owner.append(i)
    return anns, np.asarray(owner, np.int64)


def _read_boxes(anns: Sequence[Dict[str, Any]], label: Callable[[int], str]) -> Tuple[np.ndarray, np.ndarray]:
    """bool [A] crowd flags and float64 [A, 4] ``[x, y, w, h]`` boxes of the annotations."""
    crowd = np.zeros(len(anns), bool)
    for row, ann in enumerate(anns):
        if "bbox" not in ann:
            raise AnnotationError(f"{label(row)}: missing key 'bbox'")
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1):
            raise AnnotationError(f"{label(row)}: 'iscrowd' must be 0 or 1, got {iscrowd!r}")
        crowd[row] = bool(iscrowd)
    xywh = number_rows([ann["bbox"] for ann in anns], 4, lambda r: f"{label(r)}: bbox", BBOX_VALUE_NAMES,
                       finite=False)
    return crowd, xywh


def _read_keypoints(anns: Sequence[Dict[str, Any]], label: Callable[[int], str],
                    skeleton: Skeleton) -> np.ndarray:
    """float64 [A, J, 3] keypoints of the (non-crowd) annotations, values as in the file."""
    for row, ann in enumerate(anns):
        if "keypoints" not in ann:
            raise AnnotationError(f"{label(row)}: missing key 'keypoints'")
    num_joints = skeleton.num_joints
    keypoints = number_rows([ann["keypoints"] for ann in anns], 3 * num_joints,
                            lambda r: f"{label(r)}: keypoints", keypoint_value_names(skeleton.joint_names),
                            finite=False)
    return keypoints.reshape(len(anns), num_joints, 3)


def person_category(data: Any, source: str) -> Dict[str, Any]:
    """The keypoint category of a COCO-format file: the one named ``person``, else the first
    with ``keypoints``."""
    categories = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(categories, list):
        raise AnnotationError(f"{source}: a COCO file is a JSON object with a 'categories' list")
    people = [c for c in categories if isinstance(c, dict) and c.get("name") == PERSON_CATEGORY and "keypoints" in c]
    people = people or [c for c in categories if isinstance(c, dict) and "keypoints" in c]
    if not people:
        raise AnnotationError(f"{source}: no category with 'keypoints' among the categories")
    return people[0]


def resolve_skeleton(cfg):
    """``cfg`` with its skeleton settled before anything is built (``Trainer`` calls it first).

    ``--skeleton auto`` (``--dataset coco``): the training file's keypoint category, through
    :func:`config.skeletons.derive_skeleton` (a named skeleton when the joint names are one's);
    ``--skeleton FILE.json``: a category-like JSON of one's own (``keypoints`` names,
    ``skeleton`` edges 1-based, optional ``oks_sigmas``, and ``"hierarchy": "derived"`` to derive
    the tree from the edges even for a named skeleton's joints). A derived skeleton is kept whole in
    ``data.skeleton_spec`` (config.json), so every tool rebuilds it from the run directory."""
    name = cfg.data.skeleton
    if cfg.data.skeleton_spec or (name not in DERIVED_SKELETONS and not name.endswith(".json")):
        return cfg
    if name.endswith(".json"):
        source, label = name, os.path.splitext(os.path.basename(name))[0]
        data = load_json(name)
        category = data if isinstance(data, dict) and "keypoints" in data else person_category(data, name)
    else:
        if cfg.data.dataset != "coco":
            raise ValueError(f"--skeleton auto reads a COCO-format training file (--dataset coco), "
                             f"not the {cfg.data.dataset!r} data set")
        if not cfg.data.train_json:
            raise ValueError("--dataset coco needs --train-json FILE --train-images DIR (and --val-json, "
                             "--val-images): the skeleton is read from the training file (--skeleton auto)")
        source, label = cfg.data.train_json, "auto"
        category = person_category(load_json(source), source)
    skeleton = derive_skeleton(category["keypoints"], category.get("skeleton") or [], source, label,
                               category.get("oks_sigmas"), named=category.get("hierarchy") != "derived")
    if SKELETONS.get(skeleton.name) is skeleton:
        logger.info("%s: the %s skeleton (its joint names)", source, skeleton.name)
        return cfg.replace(skeleton=skeleton.name, skeleton_spec={})
    return cfg.replace(skeleton_spec=skeleton.to_dict())


def _check_structure(data: Any, source: str, skeleton: Skeleton, need_file_name: bool) -> Set[Any]:
    """Top-level layout, ids and cross references; returns the person category ids."""
    if not isinstance(data, dict):
        raise AnnotationError(f"{source}: a COCO file is a JSON object with 'images', "
                              f"'annotations' and 'categories', got a JSON {type(data).__name__}")
    require_keys(data, ("images", "annotations", "categories"), source)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise AnnotationError(f"{source}: {key!r} must be a list, got {type(data[key]).__name__}")

    for i, cat in enumerate(data["categories"]):
        require_keys(cat, ("id",), f"{source}: categories[{i}]")
    people = [c for c in data["categories"] if c.get("name") == PERSON_CATEGORY]
    people = people or [c for c in data["categories"] if "keypoints" in c]
    if not people:
        raise AnnotationError(f"{source}: no category named {PERSON_CATEGORY!r} or with "
                              f"'keypoints' among the categories")
    for cat in people:
        if "keypoints" in cat and list(cat["keypoints"]) != list(skeleton.joint_names):
            raise AnnotationError(f"{source}: category {cat['id']!r} has keypoints "
                                  f"{cat['keypoints']}, but the {skeleton.name} skeleton has "
                                  f"{list(skeleton.joint_names)} (--skeleton auto takes the file's own)")

    image_keys = ("id", "width", "height") + (("file_name",) if need_file_name else ())
    image_ids = {}
    for i, image in enumerate(data["images"]):
        require_keys(image, image_keys, f"{source}: images[{i}]")
        image_id = image["id"]
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
            raise AnnotationError(f"{source}: images[{i}]: 'id' must be an integer (or a string), "
                                  f"got {image_id!r}")
        if image_id in image_ids:
            raise AnnotationError(f"{where(source, image_id)}: duplicate image id "
                                  f"(images[{image_ids[image_id]}] and images[{i}])")
        image_ids[image_id] = i
        for key in ("width", "height"):
            v = image[key]
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise AnnotationError(f"{where(source, image_id)}: {key!r} must be a positive "
                                      f"integer, got {v!r}")

    ann_ids = {}
    for i, ann in enumerate(data["annotations"]):
        require_keys(ann, ("id", "image_id", "category_id"), f"{source}: annotations[{i}]")
        if ann["id"] in ann_ids:
            raise AnnotationError(f"{source}: annotation {ann['id']!r}: duplicate annotation id "
                                  f"(annotations[{ann_ids[ann['id']]}] and annotations[{i}])")
        ann_ids[ann["id"]] = i
        if ann["image_id"] not in image_ids:
            raise AnnotationError(f"{source}: annotation {ann['id']!r}: image id "
                                  f"{ann['image_id']!r} is not in 'images'")
    return {c["id"] for c in people}


def _where(source: str, image_id: Any, ann_id: Any) -> str:
    return f"{where(source, image_id)}, annotation {ann_id!r}"


def _region(ann: Dict[str, Any], xywh: Sequence[float]) -> Any:
    """The annotation's segmentation (polygons or RLE), or its box as a polygon when it has none."""
    segmentation = ann.get("segmentation")
    x, y, w, h = xywh
    return segmentation if segmentation else box_region(x, y, x + w, y + h)


def to_coco_json(records: Sequence[ImageRecord], image_ids: Sequence[int], file_names: Sequence[str],
                 skeleton: Skeleton = COCO) -> Dict[str, Any]:
    """Records as a COCO person-keypoints dict (people only: ``ignore_regions`` are not written).

    Args:
        records: images with ``width`` and ``height`` set.
        image_ids: the COCO integer id of each record.
        file_names: the ``file_name`` of each record.
        skeleton: joint layout of the records' keypoints.

    Annotation ids count from 1. ``area`` is the box area and ``segmentation`` the box as a
    polygon (a keypoint file has no masks to offer; pycocotools tools that need a segmentation
    still work). The category's ``skeleton`` lists the SPM hierarchy's limbs, 1-based as COCO's.
    """
    images = []
    for record, image_id, file_name in zip(records, image_ids, file_names, strict=True):
        if record.width is None or record.height is None:
            raise ValueError(f"image {record.image_id!r}: a COCO file needs the image width and height")
        images.append({"id": int(image_id), "file_name": file_name,
                       "width": int(record.width), "height": int(record.height)})
    keypoints = np.concatenate([r.keypoints for r in records] +
                               [np.zeros((0, skeleton.num_joints, 3), np.float32)])
    boxes = np.concatenate([r.boxes for r in records] + [np.zeros((0, 4), np.float32)])
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    owners = np.repeat([image["id"] for image in images], [r.num_people for r in records]).tolist()
    x1, y1, x2, y2 = boxes.T
    polygons = np.stack([x1, y1, x2, y1, x2, y2, x1, y2], axis=1)
    annotations = [
        {"id": n + 1, "image_id": owner, "category_id": 1, "iscrowd": 0, "bbox": bbox,
         "area": area, "num_keypoints": num_keypoints, "keypoints": values,
         "segmentation": [polygon]}
        for n, (owner, bbox, area, num_keypoints, values, polygon) in enumerate(zip(
            owners, json_numbers(xywh), json_numbers(xywh[:, 2] * xywh[:, 3]),
            (keypoints[..., 2] > VIS_UNLABELLED).sum(axis=1).tolist(),
            keypoint_lists(keypoints, COCO_VISIBILITY), json_numbers(polygons)))]
    category = {"id": 1, "name": PERSON_CATEGORY, "supercategory": PERSON_CATEGORY,
                "keypoints": list(skeleton.joint_names),
                "skeleton": [[p + 1, c + 1] for p, c in skeleton.limbs]}
    return {"images": images, "annotations": annotations, "categories": [category]}
