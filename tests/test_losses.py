"""SPM losses: values worked out by hand, gradients, and the replica-sum rule."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from config.config import LossConfig
from nets.losses import smooth_l1, spm_loss

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _targets(b=2, h=4, w=4, j=2):
    z = lambda c: np.zeros((b, h, w, c), np.float32)          # noqa: E731
    return {"root": z(1), "root_weight": z(1) + 1, "disp": z(2 * j), "disp_weight": z(2 * j)}


def _outputs(b=2, h=4, w=4, j=2, root=0.0):
    return {"root": np.full((b, h, w, 1), root, np.float32),
            "disp": np.zeros((b, h, w, 2 * j), np.float32)}


def test_background_is_supervised_by_l2():
    # 0.5 predicted on a zero target: 0.25 per pixel, 16 pixels per image, 2 images / batch 2.
    losses = spm_loss(_targets(), _outputs(root=0.5), LossConfig(), global_batch_size=2)
    assert float(losses["root"]) == pytest.approx(4.0)
    assert float(losses["disp"]) == 0.0
    assert float(losses["total"]) == pytest.approx(4.0)


def test_root_weight_masks_pixels():
    t = _targets()
    t["root_weight"][:, :2] = 0.0                              # half of every image ignored
    losses = spm_loss(t, _outputs(root=0.5), LossConfig(), global_batch_size=2)
    assert float(losses["root"]) == pytest.approx(2.0)


def test_weighted_l1_and_total():
    t, o = _targets(), _outputs()
    t["disp"][0, 1, 2, 0] = 0.3
    t["disp"][0, 1, 2, 1] = -0.2
    t["disp_weight"][0, 1, 2, :2] = 1.0
    t["disp"][1, 0, 0, 3] = 5.0                                 # weight 0: ignored
    o["disp"][0, 1, 2, 1] = 0.1
    cfg = LossConfig(root_loss_weight=2.0, disp_loss_weight=0.5)
    losses = spm_loss(t, o, cfg, global_batch_size=4)
    # |0 - 0.3| + |0.1 + 0.2| = 0.6 over a global batch of 4; root is 0.
    assert float(losses["disp"]) == pytest.approx(0.15)
    assert float(losses["total"]) == pytest.approx(0.5 * 0.15)


def test_smooth_l1_values_by_hand():
    cfg = LossConfig(disp_loss="smooth_l1", smooth_l1_beta=0.1)
    t, o = _targets(b=1), _outputs(b=1)
    t["disp_weight"][0, 0, 0, :2] = 1.0
    o["disp"][0, 0, 0, 0] = 0.05                                # inside: 0.05^2 / 0.2 = 0.0125
    o["disp"][0, 0, 0, 1] = -0.3                                # outside: 0.3 - 0.05 = 0.25
    losses = spm_loss(t, o, cfg, global_batch_size=1)
    assert float(losses["disp"]) == pytest.approx(0.2625)


def test_smooth_l1_is_continuous_at_its_knee():
    knee = 0.01
    eps = 1e-6
    x = tf.constant([knee - eps, knee + eps, -knee - eps, -knee + eps], tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = smooth_l1(x, knee)
    grad = tape.gradient(y, x).numpy()
    np.testing.assert_allclose(y.numpy(), knee / 2, atol=2 * eps)
    np.testing.assert_allclose(grad, [1, 1, -1, -1], atol=1e-3)


def test_weight_zero_means_zero_gradient():
    t = _targets()
    t["disp"][:] = 0.7
    t["disp_weight"][..., 1] = 1.0
    t["disp_weight"][..., 2] = 1.0
    t["root_weight"][0] = 0.0
    disp = tf.Variable(np.zeros((2, 4, 4, 4), np.float32))
    root = tf.Variable(np.full((2, 4, 4, 1), 0.5, np.float32))
    for disp_loss in ("l1", "smooth_l1"):
        with tf.GradientTape() as tape:
            losses = spm_loss(t, {"root": root, "disp": disp}, LossConfig(disp_loss=disp_loss), 2)
        g_root, g_disp = tape.gradient(losses["total"], [root, disp])
        g_disp, g_root = g_disp.numpy(), g_root.numpy()
        assert np.all(g_disp[..., [0, 3]] == 0.0) and np.all(g_disp[..., [1, 2]] != 0.0)
        assert np.all(g_root[0] == 0.0) and np.all(g_root[1] != 0.0)


def test_focal_loss_by_hand():
    # One image, a 1x3 map: target [1, 0.5, 0] (peak on the left), prediction 0.5 everywhere.
    # peak: -(1 - .5)^2 log .5; 0.5-pixel: -(1 - .5)^4 .5^2 log .5; zero pixel: -.5^2 log .5.
    t = {"root": np.array([1.0, 0.5, 0.0], np.float32).reshape(1, 1, 3, 1),
         "root_weight": np.ones((1, 1, 3, 1), np.float32),
         "disp": np.zeros((1, 1, 3, 2), np.float32), "disp_weight": np.zeros((1, 1, 3, 2), np.float32)}
    o = {"root": np.full((1, 1, 3, 1), 0.5, np.float32), "disp": np.zeros((1, 1, 3, 2), np.float32)}
    losses = spm_loss(t, o, LossConfig(root_loss="focal"), global_batch_size=1)
    assert float(losses["root"]) == pytest.approx(math.log(2) * (0.25 + 0.015625 + 0.25), rel=1e-5)
    # Two peaks in one image: the sum is divided by 2.
    t["root"] = np.array([1.0, 0.0, 1.0], np.float32).reshape(1, 1, 3, 1)
    losses = spm_loss(t, o, LossConfig(root_loss="focal"), global_batch_size=1)
    assert float(losses["root"]) == pytest.approx(math.log(2) * (0.25 + 0.25 + 0.25) / 2, rel=1e-5)


def test_losses_are_float32_for_float16_outputs():
    o = {k: tf.cast(v, tf.float16) for k, v in _outputs(root=0.5).items()}
    losses = spm_loss(_targets(), o, LossConfig(), global_batch_size=2)
    assert all(v.dtype == tf.float32 for v in losses.values())


def test_mismatched_shapes_are_refused():
    t = _targets(j=3)
    with pytest.raises(ValueError, match="disp"):
        spm_loss(t, _outputs(j=2), LossConfig(), global_batch_size=2)


_MIRRORED_SNIPPET = r"""
import json, sys
import numpy as np
import tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
sys.path.insert(0, sys.argv[1])
from config.config import LossConfig
from nets.losses import spm_loss

rng = np.random.default_rng(0)
B, h, w, c = 4, 8, 8, 6
targets = {"root": rng.uniform(0, 1, (B, h, w, 1)), "root_weight": rng.uniform(0, 1, (B, h, w, 1)) > 0.3,
           "disp": rng.normal(size=(B, h, w, c)), "disp_weight": rng.uniform(0, 1, (B, h, w, c)) > 0.7}
targets = {k: v.astype(np.float32) for k, v in targets.items()}
outputs = {"root": rng.uniform(0, 1, (B, h, w, 1)).astype(np.float32),
           "disp": rng.normal(size=(B, h, w, c)).astype(np.float32)}
cfg = LossConfig(disp_loss_weight=0.5)
single = {k: float(v) for k, v in spm_loss(targets, outputs, cfg, global_batch_size=B).items()}

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
def shard(ctx):
    n = B // ctx.num_replicas_in_sync
    i = ctx.replica_id_in_sync_group
    return ({k: v[i * n:(i + 1) * n] for k, v in targets.items()},
            {k: v[i * n:(i + 1) * n] for k, v in outputs.items()})
t_dist, o_dist = strategy.experimental_distribute_values_from_function(shard)
per_replica = strategy.run(lambda t, o: spm_loss(t, o, cfg, global_batch_size=B), args=(t_dist, o_dist))
summed = {k: float(strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None))
          for k, v in per_replica.items()}
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "single": single, "summed": summed}))
"""


def test_replica_sum_equals_single_device_loss():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _MIRRORED_SNIPPET, ROOT_DIR], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    for key in ("total", "root", "disp"):
        assert result["single"][key] > 0
        assert result["summed"][key] == pytest.approx(result["single"][key], rel=1e-5)


def _focal_by_hand(p, t, alpha, beta):
    """CenterNet's penalty-reduced focal loss of one map, written from the paper's formula:
    (the sum over cells, the number of peaks)."""
    total, peaks = 0.0, 0
    h, w = t.shape
    for y in range(h):
        for x in range(w):
            window = t[max(0, y - 1):y + 2, max(0, x - 1):x + 2]
            if t[y, x] > 0 and t[y, x] >= window.max():
                total += -((1 - p[y, x]) ** alpha) * math.log(p[y, x])
                peaks += 1
            else:
                total += -((1 - t[y, x]) ** beta) * (p[y, x] ** alpha) * math.log(1 - p[y, x])
    return total, peaks


@pytest.mark.parametrize("alpha, beta", [(2.0, 4.0), (1.0, 2.0), (3.0, 1.0)])
def test_focal_root_and_joint_losses_with_other_alpha_beta_against_the_formula(alpha, beta):
    """Root map and joint heatmaps, focal with (alpha, beta) varied, weights 2 and 0.5 in the
    total: every term the formula's value for maps with two peaks and a soft shoulder, the joint
    channels' sum divided by their peaks together (CenterNet's normalisation by all keypoints)."""
    rng = np.random.default_rng(3)
    t = np.zeros((1, 5, 6, 1), np.float32)
    t[0, 1, 1, 0], t[0, 1, 2, 0], t[0, 3, 4, 0], t[0, 4, 4, 0] = 1.0, 0.6, 1.0, 0.3
    p = rng.uniform(0.05, 0.95, size=t.shape).astype(np.float32)
    heat_t = np.concatenate([t, t[:, ::-1]], axis=-1)
    heat_p = np.concatenate([p, p[:, :, ::-1]], axis=-1)
    targets = {"root": t, "root_weight": np.ones_like(t), "disp": np.zeros((1, 5, 6, 4), np.float32),
               "disp_weight": np.zeros((1, 5, 6, 4), np.float32), "heatmaps": heat_t,
               "heatmap_weight": np.ones_like(heat_t)}
    outputs = {"root": p, "disp": np.zeros((1, 5, 6, 4), np.float32), "heatmaps": heat_p}
    cfg = LossConfig(root_loss="focal", joint_loss="focal", focal_alpha=alpha, focal_beta=beta,
                     root_loss_weight=2.0, joint_loss_weight=0.5)
    got = {k: float(v) for k, v in spm_loss(targets, outputs, cfg, global_batch_size=1).items()}
    total, peaks = _focal_by_hand(p[0, ..., 0].astype(np.float64), t[0, ..., 0].astype(np.float64), alpha, beta)
    root = total / peaks
    parts = [_focal_by_hand(heat_p[0, ..., c].astype(np.float64), heat_t[0, ..., c].astype(np.float64), alpha, beta)
             for c in range(2)]
    joints = sum(v for v, _ in parts) / sum(n for _, n in parts)
    assert peaks == 2 and [n for _, n in parts] == [2, 2]
    assert got["root"] == pytest.approx(root, rel=1e-4)
    assert got["joints"] == pytest.approx(joints, rel=1e-4)
    assert got["total"] == pytest.approx(2.0 * root + 0.5 * joints, rel=1e-4)


def test_displacement_loss_per_person_is_each_channels_mean_over_its_cells():
    """--disp-loss-norm person: each channel's weighted L1 divided by its supervised cells (a
    channel with none counts 0), summed over channels; cells: the plain sum. Weighted 0.1."""
    d_t = np.zeros((1, 2, 3, 2), np.float32)
    d_p = np.zeros_like(d_t)
    w = np.zeros_like(d_t)
    w[0, 0, :, 0] = 1.0                                  # channel 0: 3 cells, errors 1, 2, 3
    d_p[0, 0, :, 0] = [1.0, -2.0, 3.0]
    d_p[0, 1, :, 1] = 9.0                                # channel 1: errors but no supervised cell
    base = {"root": np.zeros((1, 2, 3, 1), np.float32), "root_weight": np.zeros((1, 2, 3, 1), np.float32),
            "disp": d_t, "disp_weight": w}
    outputs = {"root": np.zeros((1, 2, 3, 1), np.float32), "disp": d_p}
    person = spm_loss(base, outputs, LossConfig(disp_loss_norm="person", disp_loss_weight=0.1), 1)
    cells = spm_loss(base, outputs, LossConfig(disp_loss_norm="cells", disp_loss_weight=0.1), 1)
    assert float(person["disp"]) == pytest.approx(6.0 / 3) and float(cells["disp"]) == pytest.approx(6.0)
    assert float(person["total"]) == pytest.approx(0.2) and float(cells["total"]) == pytest.approx(0.6)
