"""The one record type every reader produces and every consumer reads.

Coordinates are continuous pixel coordinates of the original image: pixel column ``i`` covers
``[i, i + 1)``, so an integer annotation ``x`` is the left edge of its pixel (imgaug's and
``tf.image.resize``'s convention; a resize by ``s`` maps ``x`` to ``s * x``).

Visibility uses one internal convention (``config/skeletons.py``), converted at the file edges by
the readers and writers through the :class:`VisibilityCode` of each format:

=================  ========  ==================  ==============
meaning            internal  AI Challenger file  COCO file
=================  ========  ==================  ==============
not labelled       0         3                   0
labelled, hidden   1         2                   1
labelled, visible  2         1                   2
=================  ========  ==================  ==============

A joint is *labelled* when its visibility is > 0; only labelled joints are encoded as targets.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from config.skeletons import VIS_OCCLUDED, VIS_UNLABELLED, VIS_VISIBLE

_MEANING = {VIS_UNLABELLED: "not labelled", VIS_OCCLUDED: "occluded", VIS_VISIBLE: "visible"}


@dataclasses.dataclass(frozen=True)
class VisibilityCode:
    """A file format's visibility values and their internal meaning (the table above).

    Attributes:
        format: the format's name, for messages.
        to_internal_map: file value -> internal value.
    """
    format: str
    to_internal_map: Dict[int, int]

    @property
    def values(self) -> Tuple[int, ...]:
        """The file values the format allows, ascending."""
        return tuple(sorted(self.to_internal_map))

    def file_value(self, internal: int) -> int:
        """The file's value of an internal visibility."""
        return next(k for k, v in self.to_internal_map.items() if v == internal)

    @property
    def unlabelled(self) -> int:
        return self.file_value(VIS_UNLABELLED)

    @property
    def visible(self) -> int:
        return self.file_value(VIS_VISIBLE)

    def describe(self) -> str:
        """``1 (visible), 2 (occluded), 3 (not labelled)``: the allowed values, for messages."""
        return ", ".join(f"{v} ({_MEANING[self.to_internal_map[v]]})" for v in self.values)

    def invalid(self, file_vis: np.ndarray) -> np.ndarray:
        """bool mask of the entries of ``file_vis`` outside the format's set."""
        return ~np.isin(file_vis, np.asarray(self.values, np.float64))

    def to_internal(self, file_vis: np.ndarray) -> np.ndarray:
        """Internal visibility (float32) of valid file values."""
        table = np.zeros(max(self.values) + 1, np.float32)
        for k, v in self.to_internal_map.items():
            table[k] = v
        return table[np.asarray(file_vis).astype(np.intp)]

    def to_file(self, internal: np.ndarray) -> np.ndarray:
        """File visibility (int64) of internal values."""
        table = np.array([self.file_value(v) for v in range(len(self.to_internal_map))], np.int64)
        return table[np.asarray(internal).astype(np.intp)]


AIC_VISIBILITY = VisibilityCode("AI Challenger", {1: VIS_VISIBLE, 2: VIS_OCCLUDED, 3: VIS_UNLABELLED})
COCO_VISIBILITY = VisibilityCode("COCO", {0: VIS_UNLABELLED, 1: VIS_OCCLUDED, 2: VIS_VISIBLE})


@dataclasses.dataclass
class ImageRecord:
    """One image and its people.

    Attributes:
        image_id: the dataset's id (AI Challenger: the file stem; COCO: the integer id as str).
        image_path: path of the image file, or None when only annotations are known.
        keypoints: float32 [N, J, 3]: x, y, internal visibility (0, 1, 2).
        boxes: float32 [N, 4]: x1, y1, x2, y2 in pixels.
        person_names: N source keys (AI Challenger ``human1``..., COCO annotation ids as str).
        width, height: image size in pixels when known (from the file or the annotation).
        ignore_regions: COCO segmentations (polygon lists or RLE dicts, original image
            coordinates) of crowd annotations and of people without a labelled keypoint. They are
            not people of the record (no root peak); the pipeline may rasterise them
            (pycocotools.mask) to leave their pixels out of the root-map loss, as HigherHRNet does.
    """

    image_id: str
    image_path: Optional[str]
    keypoints: np.ndarray
    boxes: np.ndarray
    person_names: List[str]
    width: Optional[int] = None
    height: Optional[int] = None
    ignore_regions: List[Any] = dataclasses.field(default_factory=list)

    @property
    def num_people(self) -> int:
        return int(self.keypoints.shape[0])

    @property
    def labelled(self) -> np.ndarray:
        """bool [N, J]: joints with a label (visibility > 0)."""
        return self.keypoints[..., 2] > VIS_UNLABELLED


@dataclasses.dataclass
class ReadStats:
    """What a reader kept and what it left out (and why)."""
    source: str
    images: int = 0
    people: int = 0
    dropped_people: Dict[str, int] = dataclasses.field(default_factory=dict)
    dropped_images: Dict[str, int] = dataclasses.field(default_factory=dict)
    empty_images: int = 0   # images kept with nobody in them (valid: they teach background)

    def drop_people(self, reason: str, count: int = 1) -> None:
        """Count ``count`` people left out for ``reason`` (nothing when ``count`` is 0)."""
        if count:
            self.dropped_people[reason] = self.dropped_people.get(reason, 0) + int(count)

    def drop_image(self, reason: str) -> None:
        self.dropped_images[reason] = self.dropped_images.get(reason, 0) + 1

    def summary(self) -> str:
        parts = [f"{self.source}: {self.images} images, {self.people} people kept"]
        for what, d in (("people", self.dropped_people), ("images", self.dropped_images)):
            if d:
                parts.append(f"left out {sum(d.values())} {what} (" +
                             ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) + ")")
        if self.empty_images:
            parts.append(f"{self.empty_images} of the kept images have nobody (kept as background)")
        return "; ".join(parts)


def box_region(x1: float, y1: float, x2: float, y2: float) -> List[List[float]]:
    """A box as an ignore region (a COCO polygon), whichever way round its corners are given."""
    x1, x2 = sorted((float(x1), float(x2)))
    y1, y2 = sorted((float(y1), float(y2)))
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def empty_people(num_joints: int) -> Tuple[np.ndarray, np.ndarray]:
    """keypoints [0, J, 3] and boxes [0, 4] of an image with nobody."""
    return np.zeros((0, num_joints, 3), np.float32), np.zeros((0, 4), np.float32)
