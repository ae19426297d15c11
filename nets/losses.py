"""SPM losses: root confidence map and displacement maps, normalised for any replica count.

``spm_loss(targets, outputs, loss_cfg, global_batch_size)`` returns scalar float32 tensors
``{"total", "root", "disp"}`` with ``total = root_loss_weight * root + disp_loss_weight * disp``;
for a model with joint heatmaps (``outputs["heatmaps"]``) also ``"joints"``, and ``total`` adds
``joint_loss_weight * joints``.

Normalisation
-------------
Each term is a **per-example sum over pixels and channels**, summed over the local batch and
divided by ``global_batch_size`` (the batch summed over all replicas). Under a distribution
strategy every replica returns its share and the sum over replicas equals the single-device
loss of the whole batch, which is what ``tf.distribute`` expects of a per-replica loss
(gradients are summed across replicas). Sums over pixels, not means, keep the per-pixel gradient
independent of the map size, so the loss weights mean the same at 256 and 512 input.

Root map (``root_loss``)
------------------------
* ``l2`` (paper): ``sum root_weight * (p - t)^2`` over **all** pixels; background pixels
  (``t = 0``) are supervised, which is what suppresses false peaks. ``root_weight = 0`` only where
  the root is unknown (COCO crowd regions).
* ``focal``: the penalty-reduced focal loss of CenterNet (Zhou et al. 2019; Lin et al. 2017)
  on the probability ``p`` clipped to ``[1e-4, 1 - 1e-4]``: a peak pixel (a local 3x3 maximum of
  the target with ``t > 0``; the SPR encoder writes exactly 1 there) costs
  ``-(1 - p)^a log p``, any other pixel ``-(1 - t)^b p^a log(1 - p)``, ``a = focal_alpha``,
  ``b = focal_beta``. Per example it is divided by the number of (weighted) peaks, at least 1,
  as CenterNet divides by the number of objects, but per example so that the replica rule above
  still holds.

Displacements (``disp_loss``)
-----------------------------
``sum disp_weight * rho(d_pred - d_target)`` with ``rho = |x|`` (``l1``, paper) or the smooth
L1 ``rho(x) = x^2 / (2 k)`` for ``|x| < k``, ``|x| - k / 2`` beyond, ``k = smooth_l1_beta``:
value and slope are continuous at the knee (``k / 2`` and 1). Displacements are in normalised
units (``/ Z``, ``Z`` the output-map diagonal, nets/spr.py), so ``k = 0.01`` is about 0.9 output
pixels on a 64x64 map and 1.8 on 128x128.

``disp_loss_norm`` says what the sum is divided by. ``cells`` (the paper's form): nothing, so an
image's displacement term grows with its number of people and with ``tau^2`` (a disc of radius
7 holds about 154 cells, one of radius 3 about 29): crowded images dominate the gradient and the
balance against the focal root loss (a mean over peaks) moves with the geometry. ``person``:
each channel's sum is divided by its number of supervised cells (the discs of the people
labelled for that joint), so each channel contributes the mean error over its people's discs
and the term no longer depends on the people count or on ``tau`` (as CenterNet divides its
size and offset losses by the number of objects).

The weight beta = 0.01 on displacements (paper)
-----------------------------------------------
With L1 the gradient of one displacement entry is ``beta * disp_weight`` whatever the scale of
the displacements, so dividing the targets by ``Z`` changes the loss *value* but not the
balance of gradients. The balance is between ``beta`` per supervised displacement entry and
``2 |p - t|`` per root pixel. At initialisation (root 0.01, displacements 0) one person with
``sigma = tau = 7`` sends ``2 sum t ~ 2 pi sigma^2 ~ 300`` of gradient mass through the root and
``beta * 2J * pi tau^2 ~ 0.01 * 28 * 154 ~ 43`` through the displacements (AI Challenger,
J = 14); as the root map fits, its share shrinks and the displacements' stays. That is a
sensible split at initialisation, but it is not what learns: measured on the synthetic set
(docs/training.md: the default run's history and ``tools/benchmark.py recipe`` at the 512 geometry),
beta = 1.0 trains faster at both sizes, so the presets use 1.0 and ``--disp-loss-weight 0.01``
gives the paper's value. (Had the root loss been a mean over pixels, beta would have to shrink by the
pixel count.) With the focal root loss the root term is per peak, not per pixel: re-tune beta.

Magnitudes to expect (per image, as the ``root`` and ``disp`` entries report them, i.e. before
the loss weights): at initialisation ``root ~ N pi sigma^2 / 2 + 1e-4 h w`` (``sum t^2`` of N
Gaussians plus the 0.01 background; ~77 per person at sigma 7, ~6 at sigma 2) and ``disp = sum
disp_weight |d_target|``; see docs/architecture.md, "Model and losses", for values measured on the
AI Challenger example annotations. Training drives ``root`` towards the irreducible error of
peaks one cell off and ``disp`` towards ``(number of supervised entries) x (typical error / Z)``.

Joint heatmaps (``joint_loss``)
-------------------------------
The same two losses as the root map, per channel: ``l2`` over all pixels and channels, or the
focal loss with the peaks of every channel (the cells nearest each joint; the targets are centred
on the exact joint, so a peak holds slightly less than 1) counted together per example.
``heatmap_weight`` leaves ignore regions out, as ``root_weight`` does.

Everything is computed in float32, also when the model runs under mixed precision.
"""

from __future__ import annotations

from typing import Dict

import tensorflow as tf

FOCAL_EPS = 1e-4      # probability clip of the focal loss (CenterNet's clamp)


def _f32(t) -> tf.Tensor:
    return tf.cast(t, tf.float32)


def _per_example_sum(x: tf.Tensor) -> tf.Tensor:
    """[B, h, w, C] -> [B]."""
    return tf.reduce_sum(x, axis=[1, 2, 3])


def root_l2(pred: tf.Tensor, target: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
    """Per-example ``sum weight * (pred - target)^2``, background included. [B]."""
    return _per_example_sum(weight * tf.square(pred - target))


def root_focal(pred: tf.Tensor, target: tf.Tensor, weight: tf.Tensor,
               alpha: float = 2.0, beta: float = 4.0) -> tf.Tensor:
    """Per-example penalty-reduced focal loss over peaks, divided by the peak count. [B]."""
    p = tf.clip_by_value(pred, FOCAL_EPS, 1.0 - FOCAL_EPS)
    local_max = tf.nn.max_pool2d(target, ksize=3, strides=1, padding="SAME")
    peak = tf.cast((target >= local_max) & (target > 0.0), tf.float32)
    pos = -tf.pow(1.0 - p, alpha) * tf.math.log(p) * peak
    neg = -tf.pow(1.0 - target, beta) * tf.pow(p, alpha) * tf.math.log(1.0 - p) * (1.0 - peak)
    num_peaks = _per_example_sum(peak * tf.cast(weight > 0.0, tf.float32))
    return _per_example_sum(weight * (pos + neg)) / tf.maximum(num_peaks, 1.0)


def smooth_l1(x: tf.Tensor, knee: float) -> tf.Tensor:
    """``x^2 / (2 knee)`` inside ``|x| < knee``, ``|x| - knee / 2`` outside (C1-continuous)."""
    ax = tf.abs(x)
    return tf.where(ax < knee, 0.5 * tf.square(x) / knee, ax - 0.5 * knee)


def disp_l1(pred: tf.Tensor, target: tf.Tensor, weight: tf.Tensor, knee: float = 0.0,
            norm: str = "cells") -> tf.Tensor:
    """Per-example weighted L1 (``knee == 0``) or smooth-L1 of the displacements. [B].

    ``norm``: ``cells`` sums over the supervised cells; ``person`` divides each channel's sum by
    its supervised cells (at least 1), a mean over the people's discs (module docstring)."""
    diff = pred - target
    rho = tf.abs(diff) if knee <= 0.0 else smooth_l1(diff, knee)
    if norm == "cells":
        return _per_example_sum(weight * rho)
    if norm != "person":
        raise ValueError(f"unknown disp_loss_norm {norm!r}; choose 'cells' or 'person'")
    per_channel = tf.reduce_sum(weight * rho, axis=[1, 2]) / tf.maximum(tf.reduce_sum(weight, axis=[1, 2]), 1.0)
    return tf.reduce_sum(per_channel, axis=-1)


def _check_shapes(targets: dict, outputs: dict) -> None:
    pairs = [("root", "root_weight"), ("disp", "disp_weight")]
    if "heatmaps" in outputs:
        if "heatmaps" not in targets:
            raise ValueError("spm_loss: the model has joint heatmaps but the targets have none "
                             "(encode them with heatmaps=True)")
        pairs.append(("heatmaps", "heatmap_weight"))
    for key, weight_key in pairs:
        for name, t in ((key, targets[key]), (weight_key, targets[weight_key])):
            if not outputs[key].shape.is_compatible_with(t.shape):
                raise ValueError(f"spm_loss: target {name!r} has shape {t.shape}, the model's "
                                 f"{key!r} output {outputs[key].shape}")


def spm_loss(targets: Dict[str, tf.Tensor], outputs: Dict[str, tf.Tensor], loss_cfg,
             global_batch_size: int) -> Dict[str, tf.Tensor]:
    """The SPM loss of a (local) batch; see the module docstring for the conventions.

    Args:
        targets: ``{"root", "root_weight" [B, h, w, 1], "disp", "disp_weight" [B, h, w, 2J]}``
            (and ``"heatmaps", "heatmap_weight" [B, h, w, J]`` for a model with heatmaps).
        outputs: the model's ``{"root" [B, h, w, 1], "disp" [B, h, w, 2J]}`` (and ``"heatmaps"``).
        loss_cfg: :class:`config.config.LossConfig`.
        global_batch_size: examples in the batch summed over all replicas (the local batch on
            one device).

    Returns:
        float32 scalars ``{"total", "root", "disp"}`` (and ``"joints"``); the terms before weighting.
    """
    if global_batch_size <= 0:
        raise ValueError(f"spm_loss: global_batch_size must be positive, got {global_batch_size}")
    targets = {k: _f32(v) for k, v in targets.items()}
    outputs = {k: _f32(v) for k, v in outputs.items() if k in ("root", "disp", "heatmaps")}
    _check_shapes(targets, outputs)

    def confidence_loss(kind, key, weight_key):
        if kind == "l2":
            return root_l2(outputs[key], targets[key], targets[weight_key])
        if kind == "focal":
            return root_focal(outputs[key], targets[key], targets[weight_key],
                              loss_cfg.focal_alpha, loss_cfg.focal_beta)
        raise ValueError(f"unknown {key} loss {kind!r}; choose 'l2' or 'focal'")

    root = confidence_loss(loss_cfg.root_loss, "root", "root_weight")
    if loss_cfg.disp_loss not in ("l1", "smooth_l1"):
        raise ValueError(f"unknown disp_loss {loss_cfg.disp_loss!r}")
    knee = loss_cfg.smooth_l1_beta if loss_cfg.disp_loss == "smooth_l1" else 0.0
    disp = disp_l1(outputs["disp"], targets["disp"], targets["disp_weight"], knee, loss_cfg.disp_loss_norm)
    scale = 1.0 / float(global_batch_size)
    root = tf.reduce_sum(root) * scale
    disp = tf.reduce_sum(disp) * scale
    total = loss_cfg.root_loss_weight * root + loss_cfg.disp_loss_weight * disp
    out = {"root": root, "disp": disp}
    if "heatmaps" in outputs:
        joints = tf.reduce_sum(confidence_loss(loss_cfg.joint_loss, "heatmaps", "heatmap_weight")) * scale
        total += loss_cfg.joint_loss_weight * joints
        out["joints"] = joints
    return {"total": total, **out}
