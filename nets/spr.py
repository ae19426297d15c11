"""Structured Pose Representation (SPR): the target encoder and the in-graph decoder.

SPM (Nie et al., ICCV 2019) represents each person by one **root** (a peak in a confidence map)
and every joint by a **displacement** from an **anchor**: the root (``anchor="root"``) or, in the
hierarchical form, the joint's parent (``anchor="parent"``). The encoders (:func:`encode`,
NumPy, one image: the reference implementation the hand-worked tests check; :func:`encode_batch`,
TensorFlow, batched: what the training step runs on the device, pinned to the reference by
``tests/test_spr_tf.py``) and the decoder (TensorFlow, in the graph) are inverses and live side
by side here because they share every convention below; the round trip on real annotations is
exact up to the documented losses (people sharing a root cell, overlaps), see docs/spr.md
"Structured Pose Representation".

Conventions (both directions)
-----------------------------
* **Output-map coordinates.** A network-input point ``X`` (continuous pixel coordinates, pixel
  ``i`` covering ``[i, i + 1)``, docs/architecture.md) lies at ``x = X / stride`` on the output map. Cell ``u``
  covers ``[u, u + 1)``; its centre is ``u + 0.5``. A continuous position ``x`` lies in cell
  ``floor(x)``.
* **Root map.** One Gaussian per person, ``exp(-d^2 / sigma^2)`` (the paper's form, no factor 2),
  ``d`` the distance between cell centres and the centre of the person's **root cell**, so the
  peak is exactly 1 at that cell; people are combined by maximum; truncated at ``3 sigma``.
  Only root cells are local maxima of such a map, so max-pool NMS finds exactly them.
* **Root.** ``root_type="centroid"``: the mean of the labelled joints; ``"bbox_center"``: the box
  centre. A root outside the map is clamped into it (the root cell is the nearest border cell):
  partial people at the border keep their peak, and their displacements stay exact because they
  are measured from the cell actually used.
* **Displacements.** Channel ``2j`` is x, ``2j + 1`` is y of joint ``j``. At a cell ``c`` (centre
  ``c + 0.5``) written for joint ``j`` of a person the target is ``(p_j - (c + 0.5)) / Z``: each
  cell's value is computed from its own position, so the field is exactly linear in the reading
  position. Reading it at *any* position ``q`` inside the written disc (nearest cell, or bilinear
  interpolation at ``q``, which is exact for a linear field) gives back the float joint
  ``p_j = q + Z * value``: decoding is sub-pixel exact. ``Z = sqrt(h^2 + w^2)`` of the output map
  (``z_norm="diag"``, the paper) or 1 (``"one"``). Z is a property of the trained network (the
  map it was trained at): ``z_value`` > 0 fixes it for decoding maps of any other size.
* **Anchors and reading positions.** Joint ``j`` is written in the disc of radius ``tau`` (cell
  centres within ``tau``) around its anchor and read at the anchor: the root cell centre, or the
  position of its parent joint. Reading positions are clamped to the cell-centre range
  ``[0.5, w - 0.5] x [0.5, h - 0.5]`` on both sides, so a parent outside the map (a labelled joint
  beyond the border) still anchors its child exactly. ``tau >= sqrt(2)`` keeps the four bilinear
  neighbours of any reading position inside the disc.
* **Unlabelled parents** (``anchor="parent"``). The decoder follows a fixed reading order and
  cannot know which joints were labelled, so the encoder keeps every chain intact: an unlabelled
  joint that has a labelled descendant gets a *virtual* position equal to its own reading position
  (a zero-length bone: it sits on its nearest labelled ancestor, or on the root cell centre). Its
  channel is written with that virtual position and **weight 0** (the network is never taught a
  made-up joint), and its children are written around it with their usual weight. The decoder,
  reading the targets, lands the virtual joint on the ancestor and then reaches every labelled
  descendant exactly. Unlabelled joints without a labelled descendant are not written at all.
* **Overlaps.** Where discs of the same channel overlap (two people, or a person's virtual joint),
  each cell belongs to the **nearest anchor** (ties to the lower person index) instead of the
  paper's average, which corrupts both people. The cells a reading at an anchor depends on (its
  bilinear support: the up to 4 cells whose centres are less than one cell away in x and in y,
  which include the nearest cell) are claimed first, before any other anchor's ordinary disc
  cells, so every person whose reading support does not overlap another anchor's support in
  the same channel decodes exactly.
* **Weights.** ``disp_weight`` is 1 on cells written for a labelled joint, 0 elsewhere (the
  displacement loss only sees the discs, as in the paper); ``root_weight`` is all ones (a pipeline
  may zero crowd regions).
* **Who is encoded.** A person with no labelled joint, or with no labelled joint inside the input,
  is left out (nothing to regress, nothing visible). Labelled joints outside the input are kept
  (their displacements point out of the map).

Joint heatmaps (``--joint-heatmaps``, beyond the paper)
-------------------------------------------------------
CenterNet's multi-person pose and mmpose's SPR codec add one keypoint heatmap per joint and move
each regressed joint onto a nearby heatmap peak; regression alone is imprecise at the strict OKS
thresholds. Here (TensorFlow only: :func:`encode_batch` with ``heatmaps=True``):

* **Targets.** Channel ``j`` holds ``exp(-d^2 / joint_sigma^2)`` (the root map's form) around every
  labelled joint ``j`` inside the map, ``d`` the distance from a cell centre to the **exact**
  (sub-pixel) joint position, so the map's log is a paraboloid whose apex is the joint; people
  are combined by maximum; truncated at ``3 joint_sigma``. Unlabelled joints write nothing;
  ignore regions leave the background out of the loss as for the root map.
* **Snapping** (:func:`decode` with ``heatmaps``). Right after a joint is read from the
  displacements (so that its children are read at the snapped position), the decoder looks at
  the heatmap's local maxima (3x3) above ``snap_threshold`` whose cell centres lie within
  ``snap_radius`` of the regressed position; the nearest one (CenterNet's rule: another person's
  stronger peak nearby does not win) replaces the regressed joint by its sub-pixel apex (a parabola through the log of the peak and its two neighbours, per axis,
  offset clamped to half a cell). Otherwise the joint stays where it was regressed.
* **Person score.** ``sqrt(root peak * mean over joints of the heatmap value at the final
  joint)``: a person whose joints find no heatmap support ranks lower (COCO AP ranks by score).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from config.skeletons import ROOT, VIS_UNLABELLED, Skeleton

GAUSSIAN_TRUNCATE = 3.0    # root Gaussians are cut at 3 sigma: exp(-9) ~ 1.2e-4
_TIE_EPS = 1e-7            # squared-distance tie-break by person index (output pixels^2)


# ----------------------------------------------------------------------------- shared conventions

def output_hw(input_hw: Sequence[int], stride: int) -> Tuple[int, int]:
    """(h, w) of the output maps for a network input of ``input_hw``; must divide exactly."""
    in_h, in_w = int(input_hw[0]), int(input_hw[1])
    if in_h <= 0 or in_w <= 0 or in_h % stride or in_w % stride:
        raise ValueError(f"network input {in_w}x{in_h} is not a positive multiple of the output "
                         f"stride {stride}")
    return in_h // stride, in_w // stride


def z_factor(h: int, w: int, z_norm: str) -> float:
    """Displacement normaliser Z: the output map's diagonal ("diag", the paper) or 1 ("one").

    Z belongs to the trained network: it is the diagonal of the map it was *trained* at.
    ``SprConfig.z_value`` > 0 fixes it (``utils.predict.load_trained_model`` sets it from the
    run's config), so that maps of another input size decode with the Z the network learned.
    """
    if z_norm == "diag":
        return math.sqrt(h * h + w * w)
    if z_norm == "one":
        return 1.0
    raise ValueError(f"unknown z_norm {z_norm!r}; choose 'diag' or 'one'")


def anchor_parents(skeleton: Skeleton, anchor: str) -> Tuple[int, ...]:
    """The joint each joint is read from: ``ROOT`` for every joint (``anchor="root"``) or the
    skeleton's parent (``anchor="parent"``, the hierarchical reading)."""
    if anchor == "root":
        return (ROOT,) * skeleton.num_joints
    if anchor == "parent":
        return tuple(skeleton.parents)
    raise ValueError(f"unknown anchor {anchor!r}; choose 'parent' or 'root'")


def reading_stages(skeleton: Skeleton, anchor: str) -> Tuple[Tuple[int, ...], ...]:
    """Joints grouped by reading step: all joints at once with ``anchor="root"``, level by level
    of the hierarchy with ``anchor="parent"`` (a joint's anchor is decoded one step earlier)."""
    if anchor == "root":
        return (tuple(range(skeleton.num_joints)),)
    anchor_parents(skeleton, anchor)  # validates
    return tuple(tuple(j for j in range(skeleton.num_joints) if skeleton.levels[j] == level)
                 for level in range(1, skeleton.num_levels + 1))


def _check_tau(tau: float) -> None:
    if not tau >= math.sqrt(2.0):
        raise ValueError(f"spr tau = {tau} output pixels; it must be >= sqrt(2) so that the four "
                         f"bilinear neighbours of any reading position lie inside the written disc")


# ----------------------------------------------------------------------------- encoder (NumPy)

def root_positions(xy: np.ndarray, labelled: np.ndarray, boxes: np.ndarray,
                   root_type: str) -> np.ndarray:
    """Roots [N, 2] in the coordinates of ``xy`` [N, J, 2] / ``boxes`` [N, 4] (x1, y1, x2, y2).

    ``centroid``: mean of the labelled joints (NaN for a person without one); ``bbox_center``:
    the centre of the box.
    """
    if root_type == "centroid":
        count = labelled.sum(axis=1, keepdims=True)
        total = np.where(labelled[..., None], xy, 0.0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return total / count
    if root_type == "bbox_center":
        return 0.5 * (boxes[:, 0:2] + boxes[:, 2:4])
    raise ValueError(f"unknown root_type {root_type!r}; choose 'centroid' or 'bbox_center'")


def _root_kernel(sigma: float) -> Tuple[int, np.ndarray]:
    """Radius ``r`` and float32 [2r+1, 2r+1] window of the truncated root Gaussian."""
    r = int(math.ceil(GAUSSIAN_TRUNCATE * sigma))
    k = np.arange(-r, r + 1, dtype=np.float32)
    return r, np.exp(-(k[None, :] ** 2 + k[:, None] ** 2) / np.float32(sigma * sigma))


def _gaussian_root_map(cells: np.ndarray, h: int, w: int, sigma: float) -> np.ndarray:
    """[h, w] maximum of ``exp(-d^2 / sigma^2)`` around each integer root cell [N, 2] (x, y)."""
    out = np.zeros((h, w), np.float32)
    r, kernel = _root_kernel(sigma)
    for cx, cy in cells:
        x0, x1 = max(cx - r, 0), min(cx + r + 1, w)
        y0, y1 = max(cy - r, 0), min(cy + r + 1, h)
        window = out[y0:y1, x0:x1]
        np.maximum(window, kernel[y0 - cy + r:y1 - cy + r, x0 - cx + r:x1 - cx + r], out=window)
    return out


def _write_displacements(anchors: np.ndarray, targets: np.ndarray, joints: np.ndarray,
                         people: np.ndarray, weights: np.ndarray, h: int, w: int,
                         num_joints: int, tau: float, z: float) -> Tuple[np.ndarray, np.ndarray]:
    """Write M (person, joint) discs at once; overlaps go to the nearest anchor.

    anchors, targets: [M, 2] output-map positions; joints, people: [M] indices; weights: [M].
    Returns disp and disp_weight, float32 [h, w, 2 * num_joints].
    """
    disp = np.zeros((h * w * num_joints, 2), np.float32)
    weight = np.zeros((h * w * num_joints, 2), np.float32)
    if len(anchors):
        size = int(math.floor(2.0 * tau)) + 1          # most cells an interval of length 2 tau holds
        offsets = np.arange(size)
        first = np.ceil(anchors - tau - 0.5).astype(np.int64)          # [M, 2] first cell (x, y)
        cols = first[:, 0:1] + offsets                                 # [M, S]
        rows = first[:, 1:2] + offsets
        dx = cols + 0.5 - anchors[:, 0:1]                              # [M, S]
        dy = rows + 0.5 - anchors[:, 1:2]
        d2 = dy[:, :, None] ** 2 + dx[:, None, :] ** 2                 # [M, S(y), S(x)]
        inside = ((d2 <= tau * tau)
                  & ((rows >= 0) & (rows < h))[:, :, None]
                  & ((cols >= 0) & (cols < w))[:, None, :])
        m, yy, xx = np.nonzero(inside)
        ry, cx = rows[m, yy], cols[m, xx]
        flat = (ry * w + cx) * num_joints + joints[m]
        # The cells a bilinear reading at the anchor touches (|dx|, |dy| < 1; the nearest cell is
        # one of them) are claimed before the rest of the disc: nearest anchor first within each group.
        support = (np.abs(dx[m, xx]) < 1.0) & (np.abs(dy[m, yy]) < 1.0)
        key = d2[m, yy, xx] + np.where(support, 0.0, tau * tau + 2.0) + people[m] * _TIE_EPS
        best = np.full(h * w * num_joints, np.inf)
        np.minimum.at(best, flat, key)
        win = key == best[flat]
        flat, m, ry, cx = flat[win], m[win], ry[win], cx[win]
        disp[flat, 0] = (targets[m, 0] - (cx + 0.5)) / z
        disp[flat, 1] = (targets[m, 1] - (ry + 0.5)) / z
        weight[flat] = weights[m, None]
    return (disp.reshape(h, w, 2 * num_joints), weight.reshape(h, w, 2 * num_joints))


def encode(keypoints: np.ndarray, boxes: np.ndarray, skeleton: Skeleton, spr_cfg,
           input_hw: Sequence[int]) -> Dict[str, np.ndarray]:
    """SPR targets of one image.

    Args:
        keypoints: [N, J, 3] network-input x, y and internal visibility (0 = unlabelled).
        boxes: [N, 4] network-input x1, y1, x2, y2 (used by ``root_type="bbox_center"``).
        skeleton: the dataset's skeleton (joint count, hierarchy).
        spr_cfg: :class:`config.config.SprConfig`.
        input_hw: (height, width) of the network input.

    Returns:
        float32 ``{"root": [h, w, 1], "root_weight": [h, w, 1], "disp": [h, w, 2J],
        "disp_weight": [h, w, 2J]}`` with ``h, w = input_hw / output_stride`` (module docstring).
    """
    stride = spr_cfg.output_stride
    h, w = output_hw(input_hw, stride)
    _check_tau(spr_cfg.tau)
    z = spr_cfg.z_value or z_factor(h, w, spr_cfg.z_norm)
    parents = anchor_parents(skeleton, spr_cfg.anchor)
    J = skeleton.num_joints
    keypoints = np.asarray(keypoints, np.float64)
    boxes = np.asarray(boxes, np.float64)
    if keypoints.size == 0 and boxes.size == 0:
        keypoints, boxes = keypoints.reshape(0, J, 3), boxes.reshape(0, 4)
    if keypoints.ndim != 3 or keypoints.shape[1:] != (J, 3):
        raise ValueError(f"keypoints have shape {keypoints.shape}; skeleton {skeleton.name} "
                         f"expects [N, {J}, 3]")
    if boxes.shape != (len(keypoints), 4):
        raise ValueError(f"boxes have shape {boxes.shape}; expected [{len(keypoints)}, 4]")

    xy = keypoints[..., :2] / stride
    labelled = keypoints[..., 2] > VIS_UNLABELLED
    in_map = (xy[..., 0] >= 0) & (xy[..., 0] < w) & (xy[..., 1] >= 0) & (xy[..., 1] < h)
    keep = (labelled & in_map).any(axis=1)
    xy, labelled, boxes = xy[keep], labelled[keep], boxes[keep] / stride
    n = len(xy)

    roots = root_positions(xy, labelled, boxes, spr_cfg.root_type)
    cells = np.stack([np.clip(np.floor(roots[:, 0]), 0, w - 1),
                      np.clip(np.floor(roots[:, 1]), 0, h - 1)], axis=1).astype(np.int64)
    root_map = _gaussian_root_map(cells, h, w, spr_cfg.sigma)

    # Reading positions and (real or virtual) joint positions, parents before children.
    lo, hi = np.array([0.5, 0.5]), np.array([w - 0.5, h - 0.5])
    root_anchor = cells + 0.5
    anchors = np.empty((n, J, 2))
    positions = np.empty((n, J, 2))
    for j in skeleton.topological_order if spr_cfg.anchor == "parent" else range(J):
        p = parents[j]
        anchors[:, j] = root_anchor if p == ROOT else np.clip(positions[:, p], lo, hi)
        positions[:, j] = np.where(labelled[:, j, None], xy[:, j], anchors[:, j])
    # A joint is written when labelled or when a labelled joint is read from it.
    written = labelled.copy()
    for j in reversed(skeleton.topological_order):
        if parents[j] != ROOT:
            written[:, parents[j]] |= written[:, j]

    person, joint = np.nonzero(written)
    disp, disp_weight = _write_displacements(
        anchors[person, joint], positions[person, joint], joint, person,
        labelled[person, joint].astype(np.float32), h, w, J, spr_cfg.tau, z)
    return {"root": root_map[..., None],
            "root_weight": np.ones((h, w, 1), np.float32),
            "disp": disp,
            "disp_weight": disp_weight}


# ----------------------------------------------------------------------------- encoder (TensorFlow)

def encode_batch(keypoints, boxes, skeleton: Skeleton, spr_cfg, input_hw: Sequence[int],
                 ignore=None, heatmaps: bool = False) -> Dict[str, Any]:
    """SPR targets of a batch in TensorFlow: what the training step renders on the device.

    The same targets as :func:`encode` (the reference implementation; ``tests/test_spr_tf.py``
    pins the two together on the 1000 real AI Challenger images for every anchor and root
    type), for a batch of people padded to a fixed count, with fixed shapes throughout (no
    data-dependent shapes: XLA compiles it). Positions and the nearest-anchor keys are computed
    in float64, as the NumPy encoder does, so that the same cells win.

    Args:
        keypoints: float [B, N, J, 3] network-input x, y, internal visibility; padding people
            are all unlabelled (visibility 0) and encode nothing.
        boxes: float [B, N, 4] network-input x1, y1, x2, y2.
        skeleton, spr_cfg, input_hw: as for :func:`encode`.
        ignore: optional bool [B, h, w] output cells left out of the root loss (``root_weight``
            0) except where a person's root Gaussian is (the pipeline's ignore regions).
        heatmaps: also the joint heatmaps (module docstring, "Joint heatmaps").
    Returns:
        float32 ``{"root": [B, h, w, 1], "root_weight": [B, h, w, 1], "disp": [B, h, w, 2J],
        "disp_weight": [B, h, w, 2J]}``, with ``heatmaps`` also ``"heatmaps"`` and
        ``"heatmap_weight"`` [B, h, w, J].
    """
    stride = spr_cfg.output_stride
    h, w = output_hw(input_hw, stride)
    _check_tau(spr_cfg.tau)
    z = float(spr_cfg.z_value or z_factor(h, w, spr_cfg.z_norm))
    parents = anchor_parents(skeleton, spr_cfg.anchor)
    J = skeleton.num_joints
    with tf.name_scope("spr_encode"):
        kp = tf.convert_to_tensor(keypoints)
        if kp.shape.rank != 4 or kp.shape[2:] != (J, 3):
            raise ValueError(f"keypoints have shape {kp.shape}; skeleton {skeleton.name} expects "
                             f"[B, N, {J}, 3]")
        kp = tf.cast(kp, tf.float64)
        bx = tf.cast(boxes, tf.float64) / stride
        batch, people = tf.shape(kp)[0], tf.shape(kp)[1]
        xy = kp[..., :2] / stride                                                # [B, N, J, 2]
        labelled = kp[..., 2] > VIS_UNLABELLED                                   # [B, N, J]
        in_map = ((xy[..., 0] >= 0) & (xy[..., 0] < w) & (xy[..., 1] >= 0) & (xy[..., 1] < h))
        keep = tf.reduce_any(labelled & in_map, axis=2)                          # [B, N]
        # The NumPy encoder numbers the kept people 0, 1, ...: the tie-break uses that rank.
        rank = tf.cumsum(tf.cast(keep, tf.float64), axis=1) - 1.0

        if spr_cfg.root_type == "centroid":
            count = tf.reduce_sum(tf.cast(labelled, tf.float64), axis=2)[..., None]
            total = tf.reduce_sum(tf.where(labelled[..., None], xy, 0.0), axis=2)
            roots = total / tf.maximum(count, 1.0)
        elif spr_cfg.root_type == "bbox_center":
            roots = 0.5 * (bx[..., 0:2] + bx[..., 2:4])
        else:
            root_positions(np.zeros((0, J, 2)), np.zeros((0, J), bool), np.zeros((0, 4)),
                           spr_cfg.root_type)  # raises naming the choices
        roots = tf.where(keep[..., None] & tf.math.is_finite(roots), roots, 0.0)
        cells = tf.stack([tf.clip_by_value(tf.floor(roots[..., 0]), 0.0, w - 1.0),
                          tf.clip_by_value(tf.floor(roots[..., 1]), 0.0, h - 1.0)], axis=-1)
        cells = tf.cast(cells, tf.int32)                                         # [B, N, 2]
        b_index = tf.broadcast_to(tf.range(batch)[:, None], [batch, people])     # [B, N]

        # Root map: the Gaussian window of every kept person, combined by maximum.
        r, kernel = _root_kernel(spr_cfg.sigma)
        off = tf.range(-r, r + 1)
        ys = cells[..., 1, None, None] + off[:, None]                            # [B, N, S, 1]
        xs = cells[..., 0, None, None] + off[None, :]                            # [B, N, 1, S]
        inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w) & keep[..., None, None]
        flat = (b_index[..., None, None] * h + tf.clip_by_value(ys, 0, h - 1)) * w + \
            tf.clip_by_value(xs, 0, w - 1)                                       # [B, N, S, S]
        values = tf.where(inside, tf.constant(kernel), 0.0)      # 0 never raises a maximum
        root = tf.tensor_scatter_nd_max(tf.zeros([batch * h * w], tf.float32),
                                        tf.reshape(flat, [-1, 1]), tf.reshape(values, [-1]))
        root = tf.reshape(root, [batch, h, w, 1])
        root_weight = tf.ones_like(root)
        if ignore is not None:
            drop = tf.cast(ignore, tf.bool)[..., None] & (root <= 0.0)
            root_weight = tf.where(drop, 0.0, root_weight)

        # Reading positions and (real or virtual) joint positions, parents before children.
        root_anchor = tf.cast(cells, tf.float64) + 0.5
        lo, hi = tf.constant([0.5, 0.5], tf.float64), tf.constant([w - 0.5, h - 0.5], tf.float64)
        anchors: List = [None] * J
        positions: List = [None] * J
        for j in skeleton.topological_order if spr_cfg.anchor == "parent" else range(J):
            p = parents[j]
            anchors[j] = root_anchor if p == ROOT else tf.clip_by_value(positions[p], lo, hi)
            positions[j] = tf.where(labelled[..., j, None], xy[..., j, :], anchors[j])
        written = [labelled[..., j] for j in range(J)]
        for j in reversed(skeleton.topological_order):
            if parents[j] != ROOT:
                written[parents[j]] = written[parents[j]] | written[j]
        anchors = tf.stack(anchors, axis=2)                                      # [B, N, J, 2]
        targets = tf.stack(positions, axis=2)
        written = tf.stack(written, axis=2) & keep[..., None]                    # [B, N, J]

        # Displacement discs: every cell of the window around each anchor is a candidate; per
        # cell and channel the smallest key wins (support cells first, then the nearest
        # anchor, then the lower person): the NumPy encoder's keys, in the same float64.
        tau = float(spr_cfg.tau)
        size = int(math.floor(2.0 * tau)) + 1
        offsets = tf.range(size, dtype=tf.float64)
        first = tf.math.ceil(anchors - tau - 0.5)                                # [B, N, J, 2]
        cols = first[..., 0, None] + offsets                                     # [B, N, J, S]
        rows = first[..., 1, None] + offsets
        dx = cols + 0.5 - anchors[..., 0, None]
        dy = rows + 0.5 - anchors[..., 1, None]
        d2 = tf.square(dy)[..., :, None] + tf.square(dx)[..., None, :]           # [B, N, J, S(y), S(x)]
        valid = ((d2 <= tau * tau)
                 & ((rows >= 0) & (rows < h))[..., :, None]
                 & ((cols >= 0) & (cols < w))[..., None, :]
                 & written[..., None, None])
        support = (tf.abs(dx) < 1.0)[..., None, :] & (tf.abs(dy) < 1.0)[..., :, None]
        key = (d2 + tf.where(support, tf.constant(0.0, tf.float64), tau * tau + 2.0)
               + rank[..., None, None, None] * _TIE_EPS)
        key = tf.where(valid, key, np.inf)                        # inf never lowers a minimum
        row_i = tf.cast(tf.clip_by_value(rows, 0.0, h - 1.0), tf.int32)[..., :, None]
        col_i = tf.cast(tf.clip_by_value(cols, 0.0, w - 1.0), tf.int32)[..., None, :]
        j_index = tf.range(J)[None, None, :, None, None]
        cell = ((b_index[..., None, None, None] * h + row_i) * w + col_i) * J + j_index
        cell = tf.reshape(cell, [-1, 1])
        key = tf.reshape(key, [-1])
        best = tf.tensor_scatter_nd_min(tf.fill([batch * h * w * J], tf.constant(np.inf, tf.float64)),
                                        cell, key)
        win = tf.reshape(tf.equal(key, tf.gather(best, cell[:, 0])) & tf.math.is_finite(key),
                         tf.shape(d2))
        # One winner per cell: adding the winner's value to zeros writes it exactly.
        vx = (targets[..., 0, None, None] - (tf.cast(col_i, tf.float64) + 0.5)) / z
        vy = (targets[..., 1, None, None] - (tf.cast(row_i, tf.float64) + 0.5)) / z
        vx = tf.broadcast_to(vx, tf.shape(d2))
        vy = tf.broadcast_to(vy, tf.shape(d2))
        weight = tf.broadcast_to(tf.cast(labelled, tf.float64)[..., None, None], tf.shape(d2))
        updates = tf.cast(tf.stack([vx, vy, weight], axis=-1), tf.float32)
        updates = tf.where(win[..., None], updates, 0.0)
        out = tf.tensor_scatter_nd_add(tf.zeros([batch * h * w * J, 3], tf.float32), cell,
                                       tf.reshape(updates, [-1, 3]))
        out = tf.reshape(out, [batch, h, w, J, 3])
        disp = tf.reshape(out[..., 0:2], [batch, h, w, 2 * J])
        disp_weight = tf.reshape(tf.repeat(out[..., 2:3], 2, axis=-1), [batch, h, w, 2 * J])
        out = {"root": root, "root_weight": root_weight, "disp": disp, "disp_weight": disp_weight}
        if heatmaps:
            heat = joint_heatmaps(xy, labelled & in_map, h, w, spr_cfg.joint_sigma)
            heat_weight = tf.ones_like(heat)
            if ignore is not None:
                heat_weight = tf.where(tf.cast(ignore, tf.bool)[..., None] & (heat <= 0.0), 0.0, heat_weight)
            out.update(heatmaps=heat, heatmap_weight=heat_weight)
        return out


def joint_heatmaps(xy, present, h: int, w: int, sigma: float):
    """Joint heatmap targets (module docstring, "Joint heatmaps") in TensorFlow.

    Args:
        xy: float [B, N, J, 2] joint positions in output-map coordinates.
        present: bool [B, N, J], the joints that write a Gaussian (labelled, inside the map).
    Returns:
        float32 [B, h, w, J]: per channel the maximum over people of ``exp(-d^2 / sigma^2)``,
        ``d`` from each cell centre to the joint, within ``3 sigma`` cells of the joint's cell.
    """
    xy = tf.cast(xy, tf.float64)
    batch, J = tf.shape(xy)[0], xy.shape[2]
    r = int(math.ceil(GAUSSIAN_TRUNCATE * sigma))
    off = tf.range(-r, r + 1)
    # clipped before the cast: joints far outside the map (present is False there) stay int32
    limit = tf.constant([w, h], tf.float64)
    cell = tf.cast(tf.floor(tf.clip_by_value(xy, -1.0, limit)), tf.int32)       # [B, N, J, 2]
    ys = cell[..., 1, None, None] + off[:, None]                                  # [B, N, J, S, 1]
    xs = cell[..., 0, None, None] + off[None, :]                                  # [B, N, J, 1, S]
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w) & present[..., None, None]
    d2 = (tf.square(tf.cast(xs, tf.float64) + 0.5 - xy[..., 0, None, None])
          + tf.square(tf.cast(ys, tf.float64) + 0.5 - xy[..., 1, None, None]))
    values = tf.where(inside, tf.cast(tf.exp(-d2 / (sigma * sigma)), tf.float32), 0.0)
    b_index = tf.range(batch)[:, None, None, None, None]
    j_index = tf.range(J)[None, None, :, None, None]
    flat = ((b_index * h + tf.clip_by_value(ys, 0, h - 1)) * w + tf.clip_by_value(xs, 0, w - 1)) * J + j_index
    heat = tf.tensor_scatter_nd_max(tf.zeros([batch * h * w * J], tf.float32),
                                    tf.reshape(flat, [-1, 1]), tf.reshape(values, [-1]))
    return tf.reshape(heat, [batch, h, w, J])


# ----------------------------------------------------------------------------- decoder (TensorFlow)

def _map_hw(t):
    """(h, w) of a [B, h, w, C] tensor: Python ints when static, scalar tensors otherwise."""
    dyn = tf.shape(t)
    h = t.shape[1] if t.shape[1] is not None else dyn[1]
    w = t.shape[2] if t.shape[2] is not None else dyn[2]
    return h, w


def find_root_peaks(root, spr_cfg):
    """Root peaks by max-pool NMS, threshold and top-k.

    Args:
        root: float [B, h, w, 1] root confidence.
    Returns:
        cells int32 [B, K, 2] (x, y) of the peaks, scores float32 [B, K] (0 for empty slots),
        num_people int32 [B]; valid peaks come first, by decreasing score (K = max_people).
    """
    root = tf.cast(root, tf.float32)
    h, w = _map_hw(root)
    if isinstance(h, int) and isinstance(w, int) and h * w < spr_cfg.max_people:
        raise ValueError(f"output map {w}x{h} has fewer cells than max_people = {spr_cfg.max_people}")
    pooled = tf.nn.max_pool2d(root, ksize=spr_cfg.nms_window, strides=1, padding="SAME",
                              name="root_nms")
    peaks = tf.where(root >= pooled, root, tf.zeros_like(root))
    flat = tf.reshape(peaks, [tf.shape(root)[0], -1])
    scores, index = tf.math.top_k(flat, k=spr_cfg.max_people, sorted=True, name="root_top_k")
    valid = scores > spr_cfg.score_threshold
    cells = tf.stack([index % w, index // w], axis=-1)
    scores = tf.where(valid, scores, 0.0)
    cells = tf.where(valid[..., None], cells, 0)
    return cells, scores, tf.reduce_sum(tf.cast(valid, tf.int32), axis=1)


def cell_centres(cells, stride: int) -> np.ndarray:
    """Network-input position of output-map cells [..., 2] (x, y): ``(cell + 0.5) * stride``,
    e.g. where the decoder reads a root peak found by :func:`find_root_peaks`."""
    return (np.asarray(cells, np.float64) + 0.5) * stride


def _sample(maps_flat, h, w, points, gather: str):
    """Read [B, h*w, C] maps at output-map positions [B, M, 2].

    Positions are clamped to the cell-centre range (the encoder's rule). ``nearest`` reads the
    cell containing the position; ``bilinear`` interpolates between the four nearest centres.
    Returns the values [B, M, C] and the point they were read at [B, M, 2] (the cell centre for
    ``nearest``, the clamped position for ``bilinear``): a displacement is relative to that point.
    """
    wf, hf = tf.cast(w, tf.float32), tf.cast(h, tf.float32)
    # A diverged network reads at NaN: index a valid cell, hand back NaN (not a gather error).
    finite = tf.reduce_all(tf.math.is_finite(points), axis=-1, keepdims=True)
    points = tf.where(finite, points, 0.5)
    x = tf.clip_by_value(points[..., 0], 0.5, wf - 0.5)
    y = tf.clip_by_value(points[..., 1], 0.5, hf - 0.5)

    def at(ix, iy):
        return tf.gather(maps_flat, iy * w + ix, batch_dims=1)

    if gather == "nearest":
        ix = tf.minimum(tf.cast(tf.floor(x), tf.int32), w - 1)
        iy = tf.minimum(tf.cast(tf.floor(y), tf.int32), h - 1)
        centre = tf.cast(tf.stack([ix, iy], axis=-1), tf.float32) + 0.5
        return tf.where(finite, at(ix, iy), np.nan), tf.where(finite, centre, np.nan)
    if gather != "bilinear":
        raise ValueError(f"unknown gather {gather!r}; choose 'nearest' or 'bilinear'")
    gx, gy = x - 0.5, y - 0.5                       # in units of cell centres, >= 0
    x0f, y0f = tf.floor(gx), tf.floor(gy)
    fx, fy = (gx - x0f)[..., None], (gy - y0f)[..., None]
    x0, y0 = tf.cast(x0f, tf.int32), tf.cast(y0f, tf.int32)
    x1, y1 = tf.minimum(x0 + 1, w - 1), tf.minimum(y0 + 1, h - 1)
    top = at(x0, y0) * (1.0 - fx) + at(x1, y0) * fx
    bottom = at(x0, y1) * (1.0 - fx) + at(x1, y1) * fx
    return (tf.where(finite, top * (1.0 - fy) + bottom * fy, np.nan),
            tf.where(finite, tf.stack([x, y], axis=-1), np.nan))


class Decoded(NamedTuple):
    """What :func:`decode` returns; K = ``max_people``. The first ``num_people[b]`` slots of
    image ``b`` are the people found, by decreasing score; the other slots are zeros."""
    poses: Any        # float32 [B, K, J, 2], network-input pixels
    scores: Any       # float32 [B, K], root peak values
    num_people: Any   # int32 [B]
    roots: Any        # float32 [B, K, 2], root cell centres, network-input pixels


def snap_to_peaks(points, joints: Sequence[int], heat_flat, peaks_flat, h, w, radius: float,
                  threshold: float):
    """Move regressed joints onto nearby joint-heatmap peaks (module docstring, "Joint heatmaps").

    Args:
        points: float32 [B, K, n, 2] regressed positions of joints ``joints`` (n of them),
            output-map coordinates.
        heat_flat: float32 [B, J * h * w], the heatmaps channel-major (``[B, J, h, w]`` flattened).
        peaks_flat: the same with every value that is not a 3x3 local maximum set to 0.
        radius, threshold: ``snap_radius`` and ``snap_threshold``.
    Returns:
        The positions [B, K, n, 2] (snapped or as regressed) and the heatmap value there
        [B, K, n] (the peak's value, or the value of the cell holding the regressed position; 0
        outside the map).
    """
    # Rank 4 at most below (TFLite's broadcasting ops abort on rank 5): [B, K, n] -> [B, M].
    batch, people, n = tf.shape(points)[0], tf.shape(points)[1], len(joints)
    pts = tf.reshape(points, [batch, -1, 2])                                  # [B, M, 2]
    finite = tf.reduce_all(tf.math.is_finite(pts), axis=-1)                   # [B, M]
    pts = tf.where(finite[..., None], pts, 0.0)
    jn = tf.tile(tf.constant(list(joints), tf.int32), [people])[None, :]       # [1, M]
    wf, hf = tf.cast(w, tf.float32), tf.cast(h, tf.float32)

    def value_at(xi, yi):                       # int32 cells [B, M], clamped into the map
        xi, yi = tf.clip_by_value(xi, 0, w - 1), tf.clip_by_value(yi, 0, h - 1)
        return tf.gather(heat_flat, (jn * h + yi) * w + xi, batch_dims=1)

    def cell_of(v, size):
        return tf.cast(tf.clip_by_value(tf.floor(v), 0.0, size - 1.0), tf.int32)

    def back(t, *tail):                         # [B, M, ...] -> [B, K, n, ...]
        return tf.reshape(t, tf.stack([batch, people, n, *tail]))

    inside = finite & (pts[..., 0] >= 0) & (pts[..., 0] < wf) & (pts[..., 1] >= 0) & (pts[..., 1] < hf)
    here = tf.where(inside, value_at(cell_of(pts[..., 0], wf), cell_of(pts[..., 1], hf)), 0.0)
    if radius <= 0:
        return points, back(here)
    size = int(math.floor(2.0 * radius)) + 1
    offsets = tf.range(size, dtype=tf.float32)
    first = tf.math.ceil(pts - radius - 0.5)
    cols = first[..., 0, None] + offsets                                       # [B, M, S]
    rows = first[..., 1, None] + offsets
    dx = cols + 0.5 - pts[..., 0, None]
    dy = rows + 0.5 - pts[..., 1, None]
    d2 = tf.square(dy)[..., :, None] + tf.square(dx)[..., None, :]             # [B, M, S, S]
    near = ((d2 <= radius * radius)
            & ((rows >= 0) & (rows < hf))[..., :, None] & ((cols >= 0) & (cols < wf))[..., None, :]
            & finite[..., None, None])
    ci = tf.cast(tf.clip_by_value(cols, 0.0, wf - 1.0), tf.int32)
    ri = tf.cast(tf.clip_by_value(rows, 0.0, hf - 1.0), tf.int32)
    index = (jn[..., None, None] * h + ri[..., :, None]) * w + ci[..., None, :]
    values = tf.reshape(tf.gather(peaks_flat, tf.reshape(index, [batch, -1]), batch_dims=1),
                        tf.shape(index))
    # the nearest confident peak (CenterNet's rule): a neighbour's stronger peak does not win
    # (no inf constants: TFLite stores them as the largest float, which is finite)
    candidate = tf.reshape(near & (values > threshold), [batch, -1, size * size])
    # (ties, e.g. a joint regressed onto a cell centre between two peaks, go to the first
    # candidate in row-major order in TensorFlow and TFLite alike: a 1e-5 per index tie-break)
    key = tf.where(candidate, tf.reshape(d2, tf.shape(candidate)) + 1e-5 * tf.range(size * size, dtype=tf.float32),
                   2.0 * size * size)
    best = tf.argmin(key, axis=-1, output_type=tf.int32)                       # [B, M]
    confident = tf.reduce_any(candidate, axis=-1)
    top = tf.gather(tf.reshape(values, tf.shape(key)), best, batch_dims=2)
    px = tf.gather(ci, best % size, batch_dims=2)
    py = tf.gather(ri, best // size, batch_dims=2)

    def apex(lo, mid, hi):                      # parabola through the logs at -1, 0, 1
        lo, mid, hi = (tf.math.log(tf.maximum(v, 1e-10)) for v in (lo, mid, hi))
        curve = lo - 2.0 * mid + hi
        safe = tf.where(curve < 0.0, curve, -1.0)
        return tf.where(curve < 0.0, tf.clip_by_value(0.5 * (lo - hi) / safe, -0.5, 0.5), 0.0)

    centre = value_at(px, py)
    ox = apex(value_at(px - 1, py), centre, value_at(px + 1, py))
    oy = apex(value_at(px, py - 1), centre, value_at(px, py + 1))
    snapped = tf.stack([tf.cast(px, tf.float32) + 0.5 + ox, tf.cast(py, tf.float32) + 0.5 + oy], axis=-1)
    return (tf.where(back(confident)[..., None], back(snapped, 2), points),
            back(tf.where(confident, top, here)))


def decode(root, disp, skeleton: Skeleton, spr_cfg, heatmaps=None) -> Decoded:
    """Decode batched SPM maps into poses, in the graph (fixed shapes, no data-dependent Python).

    Args:
        root: float [B, h, w, 1] root confidence map.
        disp: float [B, h, w, 2J] displacement maps (channel 2j = x, 2j+1 = y of joint j).
        skeleton, spr_cfg: as for :func:`encode` (anchor, gather, Z, NMS, threshold, max_people;
            snap_radius and snap_threshold with ``heatmaps``).
        heatmaps: optional float [B, h, w, J] joint heatmaps: each joint, once read, snaps to a
            nearby peak, and the person score takes the heatmap values (module docstring).
    Returns:
        :class:`Decoded` (poses, scores, num_people, roots).
    """
    with tf.name_scope("spr_decode"):
        disp = tf.cast(disp, tf.float32)
        h, w = _map_hw(disp)
        J = skeleton.num_joints
        if disp.shape[-1] is not None and disp.shape[-1] != 2 * J:
            raise ValueError(f"disp has {disp.shape[-1]} channels; skeleton {skeleton.name} "
                             f"expects {2 * J}")
        if spr_cfg.z_value:                # the trained network's Z, whatever this map's size
            z = tf.constant(spr_cfg.z_value, tf.float32)
        elif spr_cfg.z_norm == "diag":     # the map size may be a tensor: z_factor's formula in TF
            z = tf.sqrt(tf.cast(h * h + w * w, tf.float32))
        else:                              # size-independent; z_factor validates the name
            z = tf.constant(z_factor(1, 1, spr_cfg.z_norm), tf.float32)
        cells, scores, num_people = find_root_peaks(root, spr_cfg)
        batch, k = tf.shape(cells)[0], spr_cfg.max_people
        disp_flat = tf.reshape(disp, [batch, -1, 2 * J])
        parents = anchor_parents(skeleton, spr_cfg.anchor)
        if heatmaps is not None:
            heat = tf.cast(heatmaps, tf.float32)
            if heat.shape[-1] is not None and heat.shape[-1] != J:
                raise ValueError(f"heatmaps have {heat.shape[-1]} channels; skeleton {skeleton.name} "
                                 f"expects {J}")
            pooled = tf.nn.max_pool2d(heat, ksize=3, strides=1, padding="SAME")
            heat_flat = tf.reshape(tf.transpose(heat, [0, 3, 1, 2]), [batch, -1])
            peaks_flat = tf.reshape(tf.transpose(tf.where(heat >= pooled, heat, 0.0), [0, 3, 1, 2]),
                                    [batch, -1])
        joint_values: List = [None] * J                 # heatmap value at each final joint

        positions: List = [None] * J                    # each [B, K, 2], output-map coordinates
        root_pos = tf.cast(cells, tf.float32) + 0.5
        for stage in reading_stages(skeleton, spr_cfg.anchor):
            n = len(stage)
            read = tf.stack([root_pos if parents[j] == ROOT else positions[parents[j]]
                             for j in stage], axis=2)                       # [B, K, n, 2]
            values, at = _sample(disp_flat, h, w, tf.reshape(read, [batch, k * n, 2]),
                                 spr_cfg.gather)
            values = tf.reshape(values, [batch, k, n, J, 2])
            select = tf.one_hot(list(stage), J, dtype=tf.float32)         # [n, J]
            offsets = tf.einsum("bknjc,nj->bknc", values, select)
            found = tf.reshape(at, [batch, k, n, 2]) + z * offsets
            if heatmaps is not None:
                found, value = snap_to_peaks(found, stage, heat_flat, peaks_flat, h, w,
                                             spr_cfg.snap_radius, spr_cfg.snap_threshold)
                for i, j in enumerate(stage):
                    joint_values[j] = value[:, :, i]
            for i, j in enumerate(stage):
                positions[j] = found[:, :, i]
        stride = float(spr_cfg.output_stride)
        poses = tf.stack(positions, axis=2) * stride
        valid = tf.sequence_mask(num_people, k)
        poses = tf.where(valid[:, :, None, None], poses, 0.0)
        roots = tf.where(valid[:, :, None], root_pos * stride, 0.0)
        if heatmaps is not None:
            support = tf.reduce_mean(tf.stack(joint_values, axis=2), axis=2)
            scores = tf.where(valid, tf.sqrt(scores * tf.maximum(support, 0.0)), 0.0)
            # top_k, not argsort: it orders ties by index too, and TFLite runs it
            _, order = tf.math.top_k(tf.where(valid, scores, -1.0), k=k, sorted=True)
            poses, scores, roots = (tf.gather(t, order, batch_dims=1) for t in (poses, scores, roots))
        return Decoded(poses, scores, num_people, roots)


def make_decoder(skeleton: Skeleton, spr_cfg, map_hw: Optional[Sequence[int]] = None,
                 jit_compile: bool = True, heatmaps: bool = False):
    """:func:`decode` as a ``tf.function`` of ``(root, disp)``, or of ``(root, disp, heatmaps)``
    with ``heatmaps``, with a fixed input signature.

    ``map_hw`` fixes the output-map size (None: any size). XLA (``jit_compile``) fuses the
    decoder's many small ops; on a 2-core CPU it runs a 128x128 map in about a third of the time
    of the plain graph (docs/spr.md).
    """
    h, w = (None, None) if map_hw is None else (int(map_hw[0]), int(map_hw[1]))
    channels = 2 * skeleton.num_joints
    spec = (tf.TensorSpec([None, h, w, 1], tf.float32, name="root"),
            tf.TensorSpec([None, h, w, channels], tf.float32, name="disp"))
    if heatmaps:
        spec += (tf.TensorSpec([None, h, w, skeleton.num_joints], tf.float32, name="heatmaps"),)

    def spr_decode(root, disp, heatmaps=None):
        return decode(root, disp, skeleton, spr_cfg, heatmaps)

    return tf.function(spr_decode, input_signature=spec, jit_compile=jit_compile, autograph=False)


def flip_maps(root, disp, skeleton: Skeleton):
    """Mirror root and displacement maps left-right (width is axis -2; NumPy or TensorFlow).

    Left and right joint channels are swapped (``skeleton.flip_index``) and x displacements
    negated, so decoding the result gives the mirrored poses: with cells mirrored as
    ``u -> w - 1 - u``, a position ``x`` on the map goes to ``w - x``.
    """
    perm = np.array([[2 * j, 2 * j + 1] for j in skeleton.flip_index]).reshape(-1)
    sign = np.tile(np.array([-1.0, 1.0], np.float32), skeleton.num_joints)
    if isinstance(disp, np.ndarray):
        return root[..., ::-1, :], np.take(disp[..., ::-1, :], perm, axis=-1) * sign
    return (tf.reverse(root, axis=[-2]),
            tf.gather(tf.reverse(disp, axis=[-2]), perm, axis=-1) * tf.constant(sign, disp.dtype))


def flip_heatmaps(heatmaps, skeleton: Skeleton):
    """Mirror joint heatmaps [..., h, w, J] left-right, left and right channels swapped (NumPy or
    TensorFlow); the heatmap counterpart of :func:`flip_maps`."""
    perm = np.asarray(skeleton.flip_index)
    if isinstance(heatmaps, np.ndarray):
        return np.take(heatmaps[..., ::-1, :], perm, axis=-1)
    return tf.gather(tf.reverse(heatmaps, axis=[-2]), perm, axis=-1)
