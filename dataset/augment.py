"""Training augmentation with imgaug, in network space after the letterbox.

Order of a training sample: decode -> letterbox to the network size (``dataset/letterbox.py``, the
same call as at test time) -> this module -> SPR targets. Augmenting *after* the letterbox keeps
one letterbox function for training and testing and makes every range relative to the network
input: ``translate_frac`` is a fraction of the input size, ``scale`` zooms the letterboxed
picture about the input centre.

One call transforms the image, the keypoints, the boxes and (COCO) the ignore mask together with
the same sampled parameters:

* horizontal flip (``flip_prob``): ``iaa.Fliplr``, then the joints are relabelled with
  ``skeleton.flip_index`` (``flipped[j] = original[flip_index[j]]``), since the person's right
  wrist becomes the one on the other side of the mirrored picture;
* ``iaa.Affine``: rotation in ``[-rotation_deg, rotation_deg]``, scale in ``[scale_min,
  scale_max]``, translation in ``[-translate_frac, translate_frac]`` of the input size per axis,
  bilinear for the image, nearest for the mask, zero fill (the letterbox's padding value);
* colour: ``iaa.Multiply`` in ``[color_mul_min, color_mul_max]`` and, with ``grayscale_prob``,
  ``iaa.Grayscale``.

Keypoints use continuous pixel coordinates (pixel ``i`` covers ``[i, i + 1)``, imgaug's own
convention), so a keypoint stays on its pixel (a test paints dots and checks). A labelled
keypoint pushed outside the input becomes unlabelled (visibility 0): the targets then say
nothing about it. Boxes become the axis-aligned box of their transformed corners, clipped to the
input.

Randomness: every call takes an integer ``seed`` and is a pure function of it, so a data
pipeline that hands out seeds from a seeded stream is reproducible however many threads run it.
imgaug augmenters carry mutable random state, so each thread works on its own copy.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from typing import Optional

import imgaug.augmenters as iaa
import numpy as np
from imgaug.augmentables.bbs import BoundingBoxesOnImage
from imgaug.augmentables.kps import KeypointsOnImage
from imgaug.augmentables.segmaps import SegmentationMapsOnImage

from config.skeletons import VIS_UNLABELLED, Skeleton


def unlabel_outside(keypoints: np.ndarray, height: int, width: int) -> np.ndarray:
    """In place: joints outside ``[0, width) x [0, height)`` become unlabelled; unlabelled joints
    are set to (0, 0). Returns ``keypoints`` ([N, J, 3] x, y, internal visibility)."""
    x, y = keypoints[..., 0], keypoints[..., 1]
    outside = (x < 0) | (x >= width) | (y < 0) | (y >= height)
    keypoints[outside, 2] = VIS_UNLABELLED
    keypoints[keypoints[..., 2] == VIS_UNLABELLED, :2] = 0.0
    return keypoints


@dataclasses.dataclass
class Augmented:
    """One augmented sample, all in network-input coordinates.

    Attributes:
        image: uint8 [H, W, 3].
        keypoints: float32 [N, J, 3]: x, y, internal visibility; joints outside the image are
            unlabelled (0).
        boxes: float32 [N, 4] x1, y1, x2, y2, clipped to the image.
        mask: bool [H, W] ignore mask (COCO crowd regions) or None.
        flipped: whether the sample was mirrored (joints already relabelled).
    """
    image: np.ndarray
    keypoints: np.ndarray
    boxes: np.ndarray
    mask: Optional[np.ndarray]
    flipped: bool


class Augmenter:
    """imgaug augmentation of a letterboxed training sample (see the module docstring)."""

    def __init__(self, aug_cfg, skeleton: Skeleton):
        a = aug_cfg
        t = a.translate_frac
        geometric = iaa.Affine(scale=(a.scale_min, a.scale_max), rotate=(-a.rotation_deg, a.rotation_deg),
                               translate_percent={"x": (-t, t), "y": (-t, t)},
                               order=1, cval=0, mode="constant", backend="cv2", name="affine")
        colour = [iaa.Multiply((a.color_mul_min, a.color_mul_max), name="multiply"),
                  iaa.Sometimes(a.grayscale_prob, iaa.Grayscale(alpha=1.0), name="grayscale")]
        # The flip decision is taken outside imgaug so the joints can be relabelled after it.
        self._plain = iaa.Sequential([geometric, *colour], name="augment")
        self._flipped = iaa.Sequential([iaa.Fliplr(1.0, name="flip"), geometric, *colour],
                                       name="augment_flipped")
        self.flip_prob = float(a.flip_prob)
        self.flip_index = np.asarray(skeleton.flip_index, np.intp)
        self._local = threading.local()

    def _augmenters(self):
        """This thread's private copies (imgaug augmenters hold mutable random state)."""
        local = self._local
        if not hasattr(local, "plain"):
            local.plain = copy.deepcopy(self._plain)
            local.flipped = copy.deepcopy(self._flipped)
        return local.plain, local.flipped

    def __call__(self, image: np.ndarray, keypoints: np.ndarray, boxes: np.ndarray, seed: int,
                 mask: Optional[np.ndarray] = None) -> Augmented:
        """Augment one sample; a pure function of the inputs and ``seed``.

        Args:
            image: uint8 [H, W, 3], letterboxed.
            keypoints: [N, J, 3] network-input x, y, internal visibility.
            boxes: [N, 4] network-input x1, y1, x2, y2.
            seed: any integer; the same seed gives the same augmentation.
            mask: optional bool [H, W] ignore mask, transformed like the image (nearest).
        """
        H, W = image.shape[:2]
        keypoints = np.asarray(keypoints, np.float32)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        n, j = keypoints.shape[:2]
        rng = np.random.default_rng(seed & 0xFFFFFFFFFFFFFFFF)
        flip = bool(rng.random() < self.flip_prob)
        plain, flipped = self._augmenters()
        aug = flipped if flip else plain
        aug.seed_(int(rng.integers(0, 2 ** 31 - 1)))

        kps = KeypointsOnImage.from_xy_array(keypoints[..., :2].reshape(-1, 2), shape=image.shape)
        bbs = BoundingBoxesOnImage.from_xyxy_array(boxes, shape=image.shape)
        segmap = (SegmentationMapsOnImage(mask.astype(np.int32), shape=image.shape)
                  if mask is not None else None)
        out = aug(image=image, keypoints=kps, bounding_boxes=bbs, segmentation_maps=segmap,
                  return_batch=True)

        xy = out.keypoints_aug.to_xy_array().reshape(n, j, 2) if n else np.zeros((0, j, 2), np.float32)
        new_kps = np.concatenate([xy, keypoints[..., 2:]], axis=-1).astype(np.float32)
        new_boxes = out.bounding_boxes_aug.to_xyxy_array().astype(np.float32).reshape(-1, 4)
        new_boxes[:, 0::2] = np.clip(new_boxes[:, 0::2], 0, W)
        new_boxes[:, 1::2] = np.clip(new_boxes[:, 1::2], 0, H)
        if flip:
            new_kps = new_kps[:, self.flip_index]
        unlabel_outside(new_kps, H, W)
        new_mask = out.segmentation_maps_aug.get_arr() > 0 if mask is not None else None
        return Augmented(image=out.images_aug[0], keypoints=new_kps, boxes=new_boxes, mask=new_mask,
                         flipped=flip)
