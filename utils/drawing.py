"""Drawing poses, root heat maps and displacement arrows (OpenCV), for tools and logs.

Conventions:

* Images are uint8 **RGB** ``[H, W, 3]`` (the pipeline's order); skeleton colours are RGB, so
  they are used as they are. :func:`save_rgb` converts to OpenCV's BGR when writing a file.
* Points are continuous pixel coordinates (pixel ``i`` covers ``[i, i + 1)``, docs/architecture.md). OpenCV
  draws in pixel-centre coordinates, so a point ``x`` is drawn at OpenCV ``x - 0.5``, with
  sub-pixel precision (``shift`` bits).
* Every function draws into the image it is given and returns it, except :func:`heat_overlay`,
  which returns a new image.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

from config.skeletons import ROOT, Skeleton
from dataset.letterbox import letterbox_image, letterbox_params

_SHIFT = 4                 # OpenCV sub-pixel bits
_ONE = 1 << _SHIFT
ROOT_COLOR = (255, 255, 255)
ARROW_COLOR = (255, 255, 0)


_FAR = 1e5   # pixels: a point farther out is drawn there (OpenCV's coordinates are 32-bit ints)


def _cv_point(xy) -> Tuple[int, int]:
    """Continuous (x, y) -> OpenCV fixed-point pixel-centre coordinates, clamped to +-1e5 pixels
    (a wild prediction far outside the picture must not stop the drawing)."""
    x, y = (min(max(float(v), -_FAR), _FAR) for v in xy[:2])
    return (int(round((x - 0.5) * _ONE)), int(round((y - 0.5) * _ONE)))


def _finite(xy) -> bool:
    return bool(np.all(np.isfinite(np.asarray(xy, np.float64))))


def draw_pose(image: np.ndarray, pose: np.ndarray, skeleton: Skeleton,
              visible: Optional[np.ndarray] = None, thickness: int = 2, radius: int = 3,
              color: Optional[Tuple[int, int, int]] = None) -> np.ndarray:
    """Limbs (each in its child joint's colour) and joints of one pose [J, 2].

    Args:
        visible: bool [J]; joints (and limbs touching them) that are False are not drawn.
        color: one colour for the whole pose instead of the skeleton's colours.
    """
    pose = np.asarray(pose, np.float64)
    visible = np.ones(skeleton.num_joints, bool) if visible is None else np.asarray(visible, bool)
    for parent, child in skeleton.limbs:
        if visible[parent] and visible[child] and _finite(pose[[parent, child]]):
            cv2.line(image, _cv_point(pose[parent]), _cv_point(pose[child]),
                     color or skeleton.joint_colors[child], thickness, cv2.LINE_AA, _SHIFT)
    for j in range(skeleton.num_joints):
        if visible[j] and _finite(pose[j]):
            cv2.circle(image, _cv_point(pose[j]), radius * _ONE, color or skeleton.joint_colors[j],
                       -1, cv2.LINE_AA, _SHIFT)
    return image


def draw_root(image: np.ndarray, xy, score: Optional[float] = None, radius: int = 5,
              color: Tuple[int, int, int] = ROOT_COLOR) -> np.ndarray:
    """A root marker (a cross in a circle), with its score written beside it when given."""
    c = _cv_point(xy)
    r = radius * _ONE
    cv2.circle(image, c, r, color, 1, cv2.LINE_AA, _SHIFT)
    cv2.line(image, (c[0] - r, c[1]), (c[0] + r, c[1]), color, 1, cv2.LINE_AA, _SHIFT)
    cv2.line(image, (c[0], c[1] - r), (c[0], c[1] + r), color, 1, cv2.LINE_AA, _SHIFT)
    if score is not None:
        org = (int(xy[0]) + radius + 2, int(xy[1]) - radius)
        cv2.putText(image, f"{score:.2f}", org, cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, 1, cv2.LINE_AA)
    return image


def draw_poses(image: np.ndarray, poses: np.ndarray, skeleton: Skeleton,
               scores: Optional[Sequence[float]] = None, roots: Optional[np.ndarray] = None,
               visible: Optional[np.ndarray] = None, thickness: int = 2) -> np.ndarray:
    """Several poses [n, J, 2], with root markers [n, 2] and scores [n] when given."""
    for i, pose in enumerate(np.asarray(poses)):
        draw_pose(image, pose, skeleton, None if visible is None else visible[i], thickness)
        if roots is not None:
            draw_root(image, roots[i], None if scores is None else float(scores[i]))
    return image


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.6,
                 colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """Blend a heat map [h, w] with values in 0..1 over the image, in proportion to the heat.

    The map is stretched to the image size (nearest, so each output cell stays a visible block);
    where the heat is 0 the image is unchanged, where it is 1 the colour covers ``alpha`` of it.
    """
    heat = np.clip(np.asarray(heat, np.float32).squeeze(), 0.0, 1.0)
    if heat.ndim != 2:
        raise ValueError(f"heat map must be [h, w] (or [h, w, 1]), got shape {np.shape(heat)}")
    H, W = image.shape[:2]
    big = cv2.resize(heat, (W, H), interpolation=cv2.INTER_NEAREST)
    colour = cv2.cvtColor(cv2.applyColorMap((big * 255).astype(np.uint8), colormap), cv2.COLOR_BGR2RGB)
    a = (alpha * big)[..., None]
    return (image.astype(np.float32) * (1 - a) + colour.astype(np.float32) * a).round().astype(np.uint8)


def draw_arrows(image: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                color: Tuple[int, int, int] = ARROW_COLOR, thickness: int = 1,
                tip: float = 0.15) -> np.ndarray:
    """Arrows from ``starts`` [M, 2] to ``ends`` [M, 2]; non-finite ones are skipped."""
    for a, b in zip(np.asarray(starts, np.float64).reshape(-1, 2),
                    np.asarray(ends, np.float64).reshape(-1, 2)):
        if _finite(a) and _finite(b):
            cv2.arrowedLine(image, _cv_point(a), _cv_point(b), color, thickness, cv2.LINE_AA,
                            _SHIFT, tip)
    return image


def draw_displacement_chains(image: np.ndarray, root, pose: np.ndarray, parents: Sequence[int],
                             labelled: Optional[np.ndarray] = None,
                             color: Tuple[int, int, int] = ARROW_COLOR) -> np.ndarray:
    """The SPR reading of one person: an arrow from each joint's anchor to the joint.

    Args:
        root: (x, y) of the root.
        pose: [J, 2] joint positions.
        parents: the anchor of each joint (``nets.spr.anchor_parents``: ``ROOT`` or a joint), so
            the arrows run root -> level-1 joints -> ... for the hierarchical reading.
        labelled: bool [J]; arrows to joints that are False are left out.
    """
    pose = np.asarray(pose, np.float64)
    keep = np.ones(len(pose), bool) if labelled is None else np.asarray(labelled, bool)
    starts = np.array([root if p == ROOT else pose[p] for p in parents], np.float64)
    return draw_arrows(image, starts[keep], pose[keep], color)


def draw_prediction(image: np.ndarray, prediction, skeleton: Skeleton) -> np.ndarray:
    """A copy of ``image`` with a prediction's skeletons, roots and scores drawn; ``prediction``
    has ``poses`` [n, J, 2], ``scores`` [n] and ``roots`` [n, 2] in the image's pixels
    (:class:`utils.predict.Prediction`)."""
    return draw_poses(image.copy(), prediction.poses, skeleton, scores=prediction.scores,
                      roots=prediction.roots)


def pad_to(image: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """``image`` in the top-left corner of a black ``hw`` canvas."""
    out = np.zeros((hw[0], hw[1], 3), np.uint8)
    out[:image.shape[0], :image.shape[1]] = image
    return out


def prediction_grid(pictures: Sequence[np.ndarray], columns: int = 3, cell: int = 320) -> np.ndarray:
    """Tile pictures (each letterboxed into a ``cell`` square) into one uint8 RGB image."""
    tiles = [letterbox_image(p, letterbox_params(p.shape[0], p.shape[1], cell, cell)) for p in pictures]
    rows = (len(tiles) + columns - 1) // columns
    grid = np.zeros((rows * cell, columns * cell, 3), np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = t
    return grid


def save_rgb(path: str, image: np.ndarray) -> str:
    """Write an RGB image (PNG/JPEG by extension); raises OSError when OpenCV cannot."""
    if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: OpenCV could not write the image (folder missing or bad extension?)")
    return path
