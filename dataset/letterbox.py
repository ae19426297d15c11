"""Letterbox geometry: the one resize-and-pad used at training and at test.

An image of ``src_h x src_w`` is resized, keeping its aspect ratio, to ``new_h x new_w`` with
``new = round(src * s)``, ``s = min(dst_h / src_h, dst_w / src_w)``, and pasted at the centre
of a ``dst_h x dst_w`` canvas of zeros. Points (continuous pixel coordinates, pixel ``i``
covering ``[i, i + 1)``, see dataset/records.py) map as ``x' = x * sx + pad_x`` with the exact
per-axis factors ``sx = new_w / src_w`` and ``sy = new_h / src_h`` of the resize, so a keypoint
stays on its pixel.

The NumPy functions serve the data pipeline and the tools; :func:`letterbox_tf` does the same
inside a TensorFlow graph (exported models); a test checks that they agree.
"""

from __future__ import annotations

import dataclasses
from typing import List, Sequence, Tuple

import cv2
import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Letterbox:
    src_h: int
    src_w: int
    dst_h: int
    dst_w: int
    new_h: int
    new_w: int
    pad_y: int
    pad_x: int

    @property
    def scale_x(self) -> float:
        return self.new_w / self.src_w

    @property
    def scale_y(self) -> float:
        return self.new_h / self.src_h

    def as_array(self) -> np.ndarray:
        """float32 [4]: sx, sy, pad_x, pad_y (the form the in-graph code uses)."""
        return np.array([self.scale_x, self.scale_y, self.pad_x, self.pad_y], np.float32)


def letterbox_params(src_h: int, src_w: int, dst_h: int, dst_w: int) -> Letterbox:
    if src_h <= 0 or src_w <= 0:
        raise ValueError(f"cannot letterbox an empty image of {src_w}x{src_h} pixels")
    s = min(dst_h / src_h, dst_w / src_w)
    new_h = min(dst_h, max(1, int(round(src_h * s))))
    new_w = min(dst_w, max(1, int(round(src_w * s))))
    return Letterbox(src_h, src_w, dst_h, dst_w, new_h, new_w,
                     (dst_h - new_h) // 2, (dst_w - new_w) // 2)


def letterbox_sizes(image: np.ndarray, sizes: Sequence[Tuple[int, int]]) -> List[Tuple[np.ndarray, Letterbox]]:
    """``(letterboxed image, Letterbox)`` of ``image`` for each network input ``(height, width)``
    of ``sizes``, each from the original (multi-scale testing)."""
    out = []
    for h, w in sizes:
        lb = letterbox_params(image.shape[0], image.shape[1], int(h), int(w))
        out.append((letterbox_image(image, lb), lb))
    return out


def _params(lb) -> Tuple[float, float, float, float]:
    """sx, sy, pad_x, pad_y of a Letterbox or of its ``as_array()`` form."""
    if isinstance(lb, Letterbox):
        return lb.scale_x, lb.scale_y, float(lb.pad_x), float(lb.pad_y)
    sx, sy, px, py = (float(v) for v in np.asarray(lb).reshape(4))
    return sx, sy, px, py


def to_network(points: np.ndarray, lb) -> np.ndarray:
    """Original-image points [..., 2] (x, y) -> network-input points.

    ``lb`` is a :class:`Letterbox` or its ``as_array()`` form (sx, sy, pad_x, pad_y).
    """
    sx, sy, px, py = _params(lb)
    points = np.asarray(points, np.float64)
    out = np.empty_like(points)
    out[..., 0] = points[..., 0] * sx + px
    out[..., 1] = points[..., 1] * sy + py
    return out


def to_original(points: np.ndarray, lb) -> np.ndarray:
    """Network-input points [..., 2] (x, y) -> original-image points (the inverse)."""
    sx, sy, px, py = _params(lb)
    points = np.asarray(points, np.float64)
    out = np.empty_like(points)
    out[..., 0] = (points[..., 0] - px) / sx
    out[..., 1] = (points[..., 1] - py) / sy
    return out


def letterbox_image(image: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Resize (bilinear, half-pixel centres) and pad an HxWxC image; keeps the dtype."""

    if image.shape[0] != lb.src_h or image.shape[1] != lb.src_w:
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, letterbox expects "
                         f"{lb.src_w}x{lb.src_h}")
    interp = cv2.INTER_AREA if lb.new_w < lb.src_w else cv2.INTER_LINEAR
    resized = cv2.resize(image, (lb.new_w, lb.new_h), interpolation=interp)
    if resized.ndim == 2:
        resized = resized[..., None]
    out = np.zeros((lb.dst_h, lb.dst_w, image.shape[2] if image.ndim == 3 else 1), image.dtype)
    out[lb.pad_y:lb.pad_y + lb.new_h, lb.pad_x:lb.pad_x + lb.new_w] = resized
    return out if image.ndim == 3 else out[..., 0]


def letterbox_tf(image, dst_h: int, dst_w: int):
    """In-graph letterbox of one image [h, w, C] of any size.

    Returns (float32 image [dst_h, dst_w, C] with values in the input's range, float32 [4]:
    sx, sy, pad_x, pad_y), the same geometry as :func:`letterbox_params`.
    """

    shape = tf.shape(image)
    src_h = tf.cast(shape[0], tf.float64)
    src_w = tf.cast(shape[1], tf.float64)
    s = tf.minimum(dst_h / src_h, dst_w / src_w)
    # Python's round() is half-to-even, as is tf.round.
    new_h = tf.clip_by_value(tf.cast(tf.round(src_h * s), tf.int32), 1, dst_h)
    new_w = tf.clip_by_value(tf.cast(tf.round(src_w * s), tf.int32), 1, dst_w)
    pad_y = (dst_h - new_h) // 2
    pad_x = (dst_w - new_w) // 2
    # The resize of letterbox_image: OpenCV's INTER_AREA when shrinking (pixel-area averaging,
    # tf's "area"), INTER_LINEAR otherwise (half-pixel bilinear, tf's "bilinear" without
    # antialiasing), rounded to whole grey levels as OpenCV's uint8 output is: they agree to
    # 1 grey level in 255 (tests/test_letterbox.py).
    size = tf.stack([new_h, new_w])
    pixels = tf.cast(image, tf.float32)
    resized = tf.cond(new_w < tf.shape(image)[1],
                      lambda: tf.image.resize(pixels, size, method="area"),
                      lambda: tf.image.resize(pixels, size, method="bilinear"))
    resized = tf.round(resized) if image.dtype == tf.uint8 else resized
    out = tf.image.pad_to_bounding_box(resized, pad_y, pad_x, dst_h, dst_w)
    params = tf.stack([tf.cast(new_w, tf.float64) / src_w, tf.cast(new_h, tf.float64) / src_h,
                       tf.cast(pad_x, tf.float64), tf.cast(pad_y, tf.float64)])
    return out, tf.cast(params, tf.float32)
