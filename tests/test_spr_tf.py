"""The TensorFlow SPR encoder (``nets.spr.encode_batch``) against the NumPy reference (``encode``).

The training step renders its targets with ``encode_batch`` on the device; ``encode`` is the
reference the hand-worked tests of ``test_spr.py`` check. Here the two must agree exactly on the
1000 real AI Challenger images (every anchor and root type), in batches padded with empty people,
compiled with XLA as ``--xla`` training runs it and as a plain graph.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from config import SprConfig, get_skeleton
from conftest import AIC_ANNOTATIONS
from dataset.ai_challenger import read_ai_challenger
from dataset.convert import estimate_image_sizes
from dataset.letterbox import letterbox_params, to_network
from nets import spr

SK = get_skeleton("ai_challenger")
J = SK.num_joints
KEYS = ("root", "root_weight", "disp", "disp_weight")


@pytest.fixture(scope="module")
def aic_people():
    records, _ = read_ai_challenger(AIC_ANNOTATIONS)
    return records, estimate_image_sizes(records)


def letterboxed(records, sizes, side):
    """float32 keypoints [I, N, J, 3] and boxes [I, N, 4], padded with unlabelled people, plus the
    unpadded per-image arrays, in network-input coordinates (what the pipeline hands over)."""
    kps, boxes = [], []
    for rec, (width, height) in zip(records, sizes):
        lb = letterbox_params(height, width, side, side)
        k = rec.keypoints.astype(np.float32).copy()
        k[..., :2] = to_network(k[..., :2], lb)
        kps.append(k)
        boxes.append(to_network(rec.boxes.reshape(-1, 2, 2), lb).reshape(-1, 4).astype(np.float32))
    n = max(len(k) for k in kps) + 2           # at least two padding people everywhere
    K = np.zeros((len(kps), n, J, 3), np.float32)
    B = np.zeros((len(kps), n, 4), np.float32)
    for i, (k, b) in enumerate(zip(kps, boxes)):
        K[i, :len(k)], B[i, :len(b)] = k, b
    return K, B, kps, boxes


def compare(cfg, side, K, B, kps, boxes, jit_compile=True, batch=100):
    encode = tf.function(lambda k, b: spr.encode_batch(k, b, SK, cfg, (side, side)),
                         jit_compile=jit_compile)
    worst = dict.fromkeys(KEYS, 0.0)
    weights_equal = True
    for s in range(0, len(K), batch):
        out = {k: v.numpy() for k, v in encode(K[s:s + batch], B[s:s + batch]).items()}
        ref = [spr.encode(k, b, SK, cfg, (side, side)) for k, b in zip(kps[s:s + batch], boxes[s:s + batch])]
        for key in KEYS:
            r = np.stack([t[key] for t in ref])
            assert out[key].shape == r.shape
            worst[key] = max(worst[key], float(np.abs(out[key] - r).max()))
        weights_equal &= all(np.array_equal(out["disp_weight"][i], t["disp_weight"]) for i, t in enumerate(ref))
    return worst, weights_equal


@pytest.mark.parametrize("anchor", ["parent", "root"])
@pytest.mark.parametrize("root_type", ["centroid", "bbox_center"])
def test_equals_numpy_on_all_real_images_256(aic_people, anchor, root_type):
    records, sizes = aic_people
    cfg = dataclasses.replace(SprConfig(), anchor=anchor, root_type=root_type)
    K, B, kps, boxes = letterboxed(records, sizes, 256)
    worst, weights_equal = compare(cfg, 256, K, B, kps, boxes)
    assert weights_equal
    assert max(worst.values()) <= 1e-6, worst


def test_equals_numpy_on_all_real_images_512_default(aic_people):
    records, sizes = aic_people
    K, B, kps, boxes = letterboxed(records, sizes, 512)
    worst, weights_equal = compare(SprConfig(), 512, K, B, kps, boxes)
    assert weights_equal
    assert max(worst.values()) <= 1e-6, worst


def test_plain_graph_equals_numpy_and_tiny_settings(aic_people):
    """Without XLA, with the tiny preset's sigma and tau and z_value fixed, on 200 images."""
    records, sizes = aic_people
    cfg = dataclasses.replace(SprConfig(), sigma=2.0, tau=3.0, z_value=50.0)
    K, B, kps, boxes = letterboxed(records[:200], sizes[:200], 256)
    worst, weights_equal = compare(cfg, 256, K, B, kps, boxes, jit_compile=False)
    assert weights_equal
    assert max(worst.values()) <= 1e-6, worst


def test_padding_people_and_empty_images_encode_nothing():
    cfg = dataclasses.replace(SprConfig(), sigma=2.0, tau=3.0)
    person = np.zeros((J, 3), np.float32)
    person[:, :2] = np.random.default_rng(0).uniform(20, 40, (J, 2))
    person[:, 2] = 2
    K = np.zeros((2, 3, J, 3), np.float32)
    K[0, 1] = person                              # image 0: the person in slot 1 of 3
    B = np.zeros((2, 3, 4), np.float32)
    B[0, 1] = [*person[:, :2].min(0), *person[:, :2].max(0)]
    out = spr.encode_batch(K, B, SK, cfg, (64, 64))
    ref = spr.encode(person[None], B[0, 1:2], SK, cfg, (64, 64))
    for key in KEYS:
        np.testing.assert_array_equal(out[key][0].numpy(), ref[key])
    empty = spr.encode(np.zeros((0, J, 3)), np.zeros((0, 4)), SK, cfg, (64, 64))
    for key in KEYS:
        np.testing.assert_array_equal(out[key][1].numpy(), empty[key])
    assert out["root"][0].numpy().max() == 1.0 and out["disp_weight"][0].numpy().sum() > 0


def test_ignore_cells_zero_the_root_weight_outside_the_gaussians():
    cfg = dataclasses.replace(SprConfig(), sigma=2.0, tau=3.0)
    K = np.zeros((1, 1, J, 3), np.float32)
    K[0, 0, :, :2], K[0, 0, :, 2] = (30.0, 30.0), 2          # every joint at (30, 30): root cell 7, 7
    ignore = np.zeros((1, 16, 16), bool)
    ignore[0, :, :10] = True                                 # the left 10 columns, root included
    out = spr.encode_batch(K, np.zeros((1, 1, 4), np.float32), SK, cfg, (64, 64), ignore=ignore)
    root, weight = out["root"].numpy()[0, ..., 0], out["root_weight"].numpy()[0, ..., 0]
    np.testing.assert_array_equal(weight, np.where(ignore[0] & (root <= 0), 0.0, 1.0))
    assert weight[7, 7] == 1.0 and weight[0, 0] == 0.0 and weight[0, 15] == 1.0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\[B, N, 14, 3\]"):
        spr.encode_batch(np.zeros((1, 2, 17, 3), np.float32), np.zeros((1, 2, 4), np.float32),
                         SK, SprConfig(), (64, 64))
