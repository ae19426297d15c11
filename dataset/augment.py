"""Training augmentation with imgaug, composed with the letterbox into one warp of the image.

Order of a training sample: decode -> letterbox to the network size (``dataset/letterbox.py``, the
same geometry as at test time) -> this module's geometry -> colour and SPR targets, both made
in the training step on the device (:func:`apply_colour`, ``nets.spr.encode_batch``). Every
range is relative to the network input: ``translate_frac`` is a fraction of the input size,
``scale`` zooms the letterboxed picture about the input centre.

imgaug samples the augmentation and moves three reference points; the affine map they fix moves
the keypoints and box corners, and the image is resampled **once**: that map, composed with the
letterbox, is applied to the decoded picture by one
``cv2.warpAffine`` (bilinear, zero fill: the letterbox's padding value). A picture shrunk by
more than half is first halved with ``cv2.INTER_AREA`` (exact factor 2, a box filter) until the
remaining warp shrinks by at most 2, so large photographs are not aliased. (The earlier order,
letterbox and then imgaug's own image warp, resampled twice and spent 1.2 ms in ``INTER_AREA``
on a 640x640 photograph for the same geometry.) ``tests/test_augment.py`` checks painted dots
against the keypoints through the composed warp.

* horizontal flip (``flip_prob``): ``iaa.Fliplr``, then the joints are relabelled with
  ``skeleton.flip_index`` (``flipped[j] = original[flip_index[j]]``), since the person's right
  wrist becomes the one on the other side of the mirrored picture;
* ``iaa.Affine``: rotation in ``[-rotation_deg, rotation_deg]``, scale in ``[scale_min,
  scale_max]``, translation in ``[-translate_frac, translate_frac]`` of the input size per axis;
* colour: a multiplier in ``[color_mul_min, color_mul_max]`` and, with ``grayscale_prob``,
  grayscale (``iaa.Multiply`` and ``iaa.Grayscale``'s operations), drawn here from imgaug's
  stochastic parameters and applied to the batch on the device (:func:`apply_colour`): on the host
  they cost 0.6 ms per 512x512 picture (a lookup table and imgaug's copies), a sixth of the work
  that is not JPEG decoding;
* the ignore mask (COCO crowds) is warped with the same matrix, nearest neighbour.

Keypoints use continuous pixel coordinates (pixel ``i`` covers ``[i, i + 1)``, imgaug's own
convention); OpenCV's matrices act on pixel indices (pixel ``i`` centred on ``i``), and the
conversion between the two is done here. A labelled keypoint pushed outside the input becomes
unlabelled (visibility 0): the targets then say nothing about it. Boxes become the axis-aligned
box of their transformed corners, clipped to the input.

Randomness: every call takes an integer ``seed`` and is a pure function of it, so a data
pipeline that hands out seeds from a seeded stream is reproducible however many threads run it.
imgaug augmenters carry mutable random state, so each thread works on its own copy.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from typing import List, Optional, Sequence

import cv2
import imgaug.augmenters as iaa
import imgaug.parameters as iap
import imgaug.random as iarandom
import numpy as np
import tensorflow as tf
from imgaug.augmentables.kps import KeypointsOnImage

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
        image: uint8 [H, W, 3], before colour augmentation.
        keypoints: float32 [N, J, 3]: x, y, internal visibility; joints outside the image are
            unlabelled (0).
        boxes: float32 [N, 4] x1, y1, x2, y2, clipped to the image.
        mask: bool [H, W] ignore mask (COCO crowd regions) or None.
        flipped: whether the sample was mirrored (joints already relabelled).
        colour: float32 [2]: multiplier and grayscale flag, for :func:`apply_colour`.
    """
    image: np.ndarray
    keypoints: np.ndarray
    boxes: np.ndarray
    mask: Optional[np.ndarray]
    flipped: bool
    colour: np.ndarray = dataclasses.field(default_factory=lambda: np.array([1.0, 0.0], np.float32))


def apply_colour(images, colour):
    """Colour augmentation of a batch, in the graph (the training step runs it on the device).

    Args:
        images: [B, H, W, 3] RGB, 0..255 (uint8 or float).
        colour: float [B, 2]: the multiplier and the grayscale flag (1: grayscale) of each
            picture, :attr:`Augmented.colour`.
    Returns:
        float32 [B, H, W, 3]: ``clip(image * multiplier, 0, 255)``, then, where the flag is set,
        its luma (ITU-R 601: 0.299 R + 0.587 G + 0.114 B, OpenCV's and so imgaug's grayscale)
        in all three channels.
    """
    images = tf.cast(images, tf.float32)
    colour = tf.cast(colour, tf.float32)
    out = tf.clip_by_value(images * colour[:, 0, None, None, None], 0.0, 255.0)
    luma = tf.tensordot(out, tf.constant([0.299, 0.587, 0.114]), axes=[[3], [0]])[..., None]
    return tf.where(colour[:, 1, None, None, None] > 0.5, tf.broadcast_to(luma, tf.shape(out)), out)


def _continuous_to_index(matrix: np.ndarray) -> np.ndarray:
    """A 2x3 map of continuous coordinates (pixel i covers [i, i + 1)) as OpenCV's map of pixel
    indices (pixel i centred on i): ``x_idx' = A x_idx + t + A (0.5, 0.5) - (0.5, 0.5)``."""
    out = np.array(matrix, np.float64)
    out[:, 2] += out[:, :2] @ np.array([0.5, 0.5]) - 0.5
    return out


def _then(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The 2x3 affine map ``second(first(x))``."""
    a = np.vstack([first, [0.0, 0.0, 1.0]])
    b = np.vstack([second, [0.0, 0.0, 1.0]])
    return (b @ a)[:2]


class Augmenter:
    """imgaug augmentation of one training sample (see the module docstring).

    Args:
        aug_cfg: :class:`config.config.AugmentConfig`.
        skeleton: the data set's skeleton (flip relabelling).
    """

    def __init__(self, aug_cfg, skeleton: Skeleton):
        a = aug_cfg
        t = a.translate_frac
        geometric = iaa.Affine(scale=(a.scale_min, a.scale_max), rotate=(-a.rotation_deg, a.rotation_deg),
                               translate_percent={"x": (-t, t), "y": (-t, t)}, name="affine")
        # The flip decision is taken outside imgaug so the joints can be relabelled after it.
        self._plain = iaa.Sequential([geometric], name="geometry")
        self._flipped = iaa.Sequential([iaa.Fliplr(1.0, name="flip"), geometric], name="geometry_flipped")
        # Colour parameters, as iaa.Multiply and iaa.Sometimes(p, iaa.Grayscale) draw them.
        self._multiplier = iap.Uniform(a.color_mul_min, a.color_mul_max)
        self._grayscale = iap.Binomial(a.grayscale_prob)
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
                 mask: Optional[np.ndarray] = None, letterbox=None) -> Augmented:
        """Augment one sample (a batch of one, :meth:`augment_batch`); a pure function of the
        inputs and ``seed``.

        Args:
            image: uint8 [h, w, 3]: the decoded picture when ``letterbox`` is given (it is
                letterboxed by the same warp), else the network-size picture.
            keypoints: [N, J, 3] network-input x, y, internal visibility.
            boxes: [N, 4] network-input x1, y1, x2, y2.
            seed: any integer; the same seed gives the same augmentation.
            mask: optional bool [h, w] ignore mask of ``image``, warped with it (nearest).
            letterbox: the :class:`dataset.letterbox.Letterbox` of ``image`` (None: the image
                is already at the network size).
        """
        return self.augment_batch([image], [keypoints], [boxes], seed, [mask], [letterbox])[0]

    def augment_batch(self, images: Sequence[np.ndarray], keypoints: Sequence[np.ndarray],
                      boxes: Sequence[np.ndarray], seed: int,
                      masks: Optional[Sequence[Optional[np.ndarray]]] = None,
                      letterboxes: Optional[Sequence] = None,
                      out: Optional[np.ndarray] = None) -> List[Augmented]:
        """Augment a batch of samples (arguments as for :meth:`__call__`, one per sample).

        One imgaug call moves the reference points of every unflipped sample, one those of every
        flipped sample: imgaug's per-call cost (about 0.6 ms) is paid per batch, not per picture. The
        colour parameters are drawn, not applied (:func:`apply_colour`). A pure function of the
        inputs and ``seed``. ``out``: a uint8 [B, H, W, 3] array the pictures are warped into
        (the samples' ``image`` are then its rows).
        """
        count = len(images)
        masks = list(masks) if masks is not None else [None] * count
        letterboxes = list(letterboxes) if letterboxes is not None else [None] * count
        rng = np.random.default_rng(seed & 0xFFFFFFFFFFFFFFFF)
        flips = rng.random(count) < self.flip_prob
        plain, flipped = self._augmenters()
        for augmenter in (plain, flipped):
            augmenter.seed_(int(rng.integers(0, 2 ** 31 - 1)))
        colour_rng = iarandom.RNG(int(rng.integers(0, 2 ** 31 - 1)))
        colour = np.stack([self._multiplier.draw_samples((count,), random_state=colour_rng),
                           self._grayscale.draw_samples((count,), random_state=colour_rng)], axis=1)
        colour = colour.astype(np.float32)

        sizes, to_nets, points = [], [], []
        for image, kps, bxs, lb in zip(images, keypoints, boxes, letterboxes):
            if lb is None:
                H, W = image.shape[:2]
                to_net = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
            else:
                if image.shape[:2] != (lb.src_h, lb.src_w):
                    raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, letterbox expects "
                                     f"{lb.src_w}x{lb.src_h}")
                H, W = lb.dst_h, lb.dst_w
                to_net = np.array([[lb.scale_x, 0.0, lb.pad_x], [0.0, lb.scale_y, lb.pad_y]])
            points.append(np.array([[0.0, 0.0], [W, 0.0], [0.0, H]], np.float32))
            sizes.append((H, W))
            to_nets.append(to_net)

        # imgaug moves three reference points of each sample: they fix its affine map, which
        # then moves the joints and box corners (imgaug's Keypoint objects cost 10 us apiece).
        moved: List[np.ndarray] = [None] * count
        for group, geometry in ((np.flatnonzero(~flips), plain), (np.flatnonzero(flips), flipped)):
            if len(group):
                group_moved = geometry(keypoints=[KeypointsOnImage.from_xy_array(points[i], shape=(*sizes[i], 3))
                                                  for i in group])
                for i, kois in zip(group, group_moved):
                    moved[i] = kois.to_xy_array().astype(np.float32)

        # Same-size outputs are warped straight into one array.
        same = len(set(sizes)) == 1
        if out is not None and (not same or out.shape != (count, *sizes[0], 3) or out.dtype != np.uint8):
            raise ValueError(f"out has shape {out.shape} {out.dtype}; the batch needs uint8 "
                             f"{(count, *sizes[0], 3) if same else 'pictures of one size'}")
        warped = out if out is not None else (
            np.empty((count, *sizes[0], 3), np.uint8) if same and count else [None] * count)
        results = []
        for i in range(count):
            (H, W), image, mask = sizes[i], images[i], masks[i]
            augment = cv2.getAffineTransform(points[i], moved[i]).astype(np.float64)
            # The picture: letterbox then augmentation, one warp (after halvings of large pictures).
            to_input = _then(to_nets[i], augment)            # continuous picture -> network input
            matrix, picture = to_input, image
            while abs(np.linalg.det(matrix[:, :2])) < 0.25 and min(picture.shape[:2]) >= 4:
                h2, w2 = picture.shape[0] // 2, picture.shape[1] // 2
                picture = cv2.resize(picture[:2 * h2, :2 * w2], (w2, h2), interpolation=cv2.INTER_AREA)
                matrix = matrix @ np.diag([2.0, 2.0, 1.0])   # halved coordinates -> picture
            picture = cv2.warpAffine(picture, _continuous_to_index(matrix), (W, H),
                                     dst=warped[i] if same else None, flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            if not same:
                warped[i] = picture
            new_mask = None
            if mask is not None:
                new_mask = cv2.warpAffine(mask.astype(np.uint8), _continuous_to_index(to_input),
                                          (W, H), flags=cv2.INTER_NEAREST,
                                          borderMode=cv2.BORDER_CONSTANT, borderValue=0) > 0
            kps = np.asarray(keypoints[i], np.float32)
            bxs = np.asarray(boxes[i], np.float32).reshape(-1, 4)
            xy = kps[..., :2] @ augment[:, :2].T + augment[:, 2]
            new_kps = np.concatenate([xy, kps[..., 2:]], axis=-1).astype(np.float32)
            corners = bxs[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2)
            box_xy = corners @ augment[:, :2].T + augment[:, 2]
            new_boxes = np.concatenate([box_xy.min(axis=1), box_xy.max(axis=1)], axis=1).astype(np.float32)
            new_boxes[:, 0::2] = np.clip(new_boxes[:, 0::2], 0, W)
            new_boxes[:, 1::2] = np.clip(new_boxes[:, 1::2], 0, H)
            if flips[i]:
                new_kps = new_kps[:, self.flip_index]
            unlabel_outside(new_kps, H, W)
            results.append(Augmented(image=warped[i], keypoints=new_kps, boxes=new_boxes, mask=new_mask,
                                     flipped=bool(flips[i]), colour=colour[i]))
        return results
