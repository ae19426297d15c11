"""AI Challenger <-> COCO keypoint annotations.

Joint orders (``config/skeletons.py``)::

    AI Challenger (14)        COCO (17)
     0 right_shoulder  <->     6 right_shoulder
     1 right_elbow     <->     8 right_elbow
     2 right_wrist     <->    10 right_wrist
     3 left_shoulder   <->     5 left_shoulder
     4 left_elbow      <->     7 left_elbow
     5 left_wrist      <->     9 left_wrist
     6 right_hip       <->    12 right_hip
     7 right_knee      <->    14 right_knee
     8 right_ankle     <->    16 right_ankle
     9 left_hip        <->    11 left_hip
    10 left_knee       <->    13 left_knee
    11 left_ankle      <->    15 left_ankle
    12 head_top        ->      (none: lost)
    13 neck            ->      (none: lost)
        (none)         <-      0 nose, 1 left_eye, 2 right_eye, 3 left_ear, 4 right_ear

The twelve limb joints are matched by name (``config.skeletons.joint_mapping``); a joint with no
partner is written unlabelled (AI Challenger ``0, 0, 3``; COCO ``0, 0, 0``). Visibility is carried
through the internal convention, so visible stays visible and occluded stays occluded.

Both directions go through the validating readers, so a converted file holds what a reader keeps:
people with a labelled joint and a box of non-zero size. COCO crowd regions and keypoint-less
people have no AI Challenger form and are not written. A person whose only labelled joints have no
partner (e.g. only head top and neck) is written with no labelled joint; the reader of the other
format then leaves them out (COCO: as an ignore region).

Ids: AI Challenger's ``image_id`` is the image file stem. COCO -> AI Challenger uses the stem of
``file_name`` (``000000397133.jpg`` -> ``000000397133``); AI Challenger -> COCO writes
``file_name = <image_id>.jpg`` and integer ids: ``int(image_id)`` when every id is a decimal
number (so COCO -> AIC -> COCO keeps them), else 1, 2, ... in file order. Person keys become
``human1``, ``human2``...; COCO annotation ids count from 1.

Image sizes: a COCO file needs each image's width and height, which an AI Challenger file lacks.
They come from ``image_sizes`` (e.g. :func:`image_sizes_from_dir`, reading only the image headers);
for an image without one, the size is estimated as the smallest that holds every box corner and
labelled joint (``floor(max) + 1`` pixels), with a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from config.skeletons import AI_CHALLENGER, COCO, Skeleton, joint_mapping
from dataset.ai_challenger import IMAGE_EXTENSION, ai_challenger_records, to_ai_challenger_json
from dataset.coco import coco_records, to_coco_json
from dataset.errors import AnnotationError
from dataset.records import ImageRecord

logger = logging.getLogger(__name__)

Size = Tuple[int, int]   # (width, height)


def remap_joints(keypoints: np.ndarray, src: Skeleton, dst: Skeleton) -> np.ndarray:
    """[N, src J, 3] keypoints in ``dst``'s joint order [N, dst J, 3]; joints ``src`` lacks are
    unlabelled (0, 0, 0 in the internal convention)."""
    src_index, dst_index = _joint_indices(src, dst)
    out = np.zeros((len(keypoints), dst.num_joints, 3), np.float32)
    out[:, dst_index] = keypoints[:, src_index]
    return out


@functools.lru_cache(maxsize=None)
def _joint_indices(src: Skeleton, dst: Skeleton) -> Tuple[np.ndarray, np.ndarray]:
    pairs = np.array(joint_mapping(src, dst), np.intp).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def aic_to_coco(aic_list: Any, image_sizes: Optional[Mapping[str, Size]] = None,
                image_dir: Optional[str] = None, source: str = "AI Challenger annotations") -> Dict[str, Any]:
    """An AI Challenger annotation list (parsed JSON) as a COCO person-keypoints dict.

    Args:
        aic_list: the parsed AI Challenger JSON.
        image_sizes: ``{image_id: (width, height)}`` of some or all images.
        image_dir: folder of the images; the size of an image not in ``image_sizes`` is read from
            ``image_dir/<image_id>.jpg`` (:func:`image_sizes_from_dir`). Images whose size is still
            unknown get an estimate (see the module docstring) and one warning covers them all.
        source: what to call ``aic_list`` in error messages (the file path).

    Raises AnnotationError for malformed input (``dataset.ai_challenger.parse_ai_challenger``),
    FileNotFoundError / ValueError for a missing or unreadable image in ``image_dir``.
    """
    records, stats = ai_challenger_records(aic_list, source, skeleton=AI_CHALLENGER)
    logger.info(stats.summary())
    sizes = dict(image_sizes or {})
    if image_dir is not None:
        sizes.update(image_sizes_from_dir([r.image_id for r in records if r.image_id not in sizes],
                                          image_dir))
    missing = [r.image_id for r in records if r.image_id not in sizes]
    if missing:
        logger.warning("%d of %d images have no known size; using the smallest size that holds "
                       "their annotations (largest coordinate + 1 px). Give the image folder for "
                       "true sizes.", len(missing), len(records))
        estimated = estimate_image_sizes([r for r in records if r.image_id not in sizes])
        sizes.update(zip(missing, estimated))
    records = [dataclasses.replace(r, keypoints=remap_joints(r.keypoints, AI_CHALLENGER, COCO),
                                   width=int(sizes[r.image_id][0]), height=int(sizes[r.image_id][1]))
               for r in records]
    ids = [r.image_id for r in records]
    return to_coco_json(records, coco_image_ids(ids), [i + IMAGE_EXTENSION for i in ids], COCO)


def coco_to_aic(coco_dict: Any, source: str = "COCO annotations") -> List[Dict[str, Any]]:
    """A COCO person-keypoints dict (parsed JSON) as an AI Challenger annotation list.

    Image ids become the stems of the ``file_name`` entries (the ids as text when there is no
    ``file_name``). Raises AnnotationError for malformed input, or when two images share a stem.
    """
    records, stats = coco_records(coco_dict, source, skeleton=COCO)
    logger.info(stats.summary())
    stems = {str(image["id"]): os.path.splitext(os.path.basename(str(image.get("file_name", image["id"]))))[0]
             for image in coco_dict["images"]}
    seen: Dict[str, str] = {}
    for image_id, stem in stems.items():
        if stem in seen:
            raise AnnotationError(f"{source}: images {seen[stem]} and {image_id} have the same file "
                                  f"stem {stem!r}, which would be one AI Challenger image id")
        seen[stem] = image_id
    records = [dataclasses.replace(r, keypoints=remap_joints(r.keypoints, COCO, AI_CHALLENGER),
                                   image_id=stems[r.image_id],
                                   person_names=[f"human{k + 1}" for k in range(r.num_people)])
               for r in records]
    return to_ai_challenger_json(records)


def coco_image_ids(image_ids: Sequence[str]) -> List[int]:
    """COCO integer ids: ``int(id)`` when every id is a distinct decimal number, else 1, 2, ..."""
    if all(i.isdecimal() for i in image_ids):
        numbers = [int(i) for i in image_ids]
        if len(set(numbers)) == len(numbers):
            return numbers
    return list(range(1, len(image_ids) + 1))


def estimate_image_sizes(records: Sequence[ImageRecord]) -> List[Size]:
    """The smallest (width, height) holding each record's boxes and labelled joints.

    Pixel column ``i`` covers ``[i, i + 1)``, so a coordinate ``x`` needs a width of
    ``floor(x) + 1``. An image with nobody gets the largest estimate of the others (1 x 1 when
    every image is empty).
    """
    sizes = []
    for r in records:
        labelled = r.labelled
        points = np.concatenate([r.keypoints[..., :2][labelled], r.boxes.reshape(-1, 2)], axis=0)
        sizes.append(tuple(int(v) + 1 for v in np.floor(points.max(axis=0))) if len(points) else None)
    known = [s for s in sizes if s is not None]
    fallback = tuple(np.max(known, axis=0).tolist()) if known else (1, 1)
    return [s if s is not None else fallback for s in sizes]


def image_sizes_from_dir(image_ids: Sequence[str], image_dir: str,
                         extension: str = IMAGE_EXTENSION) -> Dict[str, Size]:
    """``{image_id: (width, height)}`` of ``image_dir/<image_id><extension>``, from the file headers.

    PIL reads only the header, so this takes milliseconds per image rather than a full decode.
    Raises FileNotFoundError naming the first missing image, ValueError for an unreadable one.
    """
    sizes = {}
    for image_id in image_ids:
        path = os.path.join(image_dir, image_id + extension)
        try:
            with Image.open(path) as image:
                sizes[image_id] = image.size
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such image (image id {image_id!r})") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path}: cannot read the image size ({e})") from None
    return sizes
