"""Prediction at any input size, flip and multi-scale testing (utils/predict.py)."""

import numpy as np
import pytest
import tensorflow as tf

from training_helpers import random_head_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("run"))
    random_head_run(d, score_threshold=0.0, max_people=8, nms_window=3)
    return d


def _image(h, w, seed=1):
    return np.random.default_rng(seed).integers(0, 255, size=(h, w, 3), dtype=np.uint8)


def test_loaded_run_decodes_with_the_training_z_at_any_size(run_dir):
    """The maps of the training size (64x64 input, 16x16 maps), embedded in a canvas twice as
    large (root: zeros around; displacements: edge values), decode to the same poses, shifted by
    the offset, to 1e-3 px: every joint read at a position inside the small map (a reading
    beyond its border is clamped there, by the SPR convention, and not in the larger map).
    Decoding with the Z of the larger map (the earlier behaviour) is off by pixels."""
    import dataclasses
    from nets.spr import decode
    from utils.predict import load_trained_model, network_maps

    model, cfg = load_trained_model(run_dir, overrides={"input_height": 128, "input_width": 128})
    assert cfg.spr.z_value == pytest.approx(np.hypot(16, 16))     # the training map's diagonal
    root, disp = (t.numpy() for t in network_maps(model, tf.constant(_image(64, 64)[None], tf.float32),
                                                  cfg.skeleton))
    small = decode(root, disp, cfg.skeleton, cfg.spr)
    big_root = np.pad(root, ((0, 0), (8, 8), (8, 8), (0, 0)))
    big_disp = np.pad(disp, ((0, 0), (8, 8), (8, 8), (0, 0)), mode="edge")
    big = decode(big_root, big_disp, cfg.skeleton, cfg.spr)
    n = int(small.num_people[0])
    assert n == int(big.num_people[0]) == 8
    poses, roots = small.poses[0, :n].numpy(), small.roots[0, :n].numpy()
    parents = np.array(cfg.skeleton.parents)
    reading = np.where((parents < 0)[None, :, None], roots[:, None], poses[:, np.maximum(parents, 0)]) / 4
    inside = ((reading >= 0.5) & (reading <= 15.5)).all(axis=-1)          # [n, J]
    for level in range(2, cfg.skeleton.num_levels + 1):                 # and every ancestor's too
        for j in range(cfg.skeleton.num_joints):
            if cfg.skeleton.levels[j] == level:
                inside[:, j] &= inside[:, parents[j]]
    assert inside.sum() >= 40                                           # 45% of 112 joints
    np.testing.assert_allclose((big.poses[0, :n].numpy() - 32.0)[inside], poses[inside], atol=1e-3)
    stale = decode(big_root, big_disp, cfg.skeleton, dataclasses.replace(cfg.spr, z_value=0.0))
    assert np.abs(stale.poses[0, :n].numpy() - 32.0 - poses)[inside].max() > 1.0


def test_predictor_flip_equals_the_average_of_the_two_maps_decoded(run_dir):
    from nets.spr import decode, flip_maps
    from utils.predict import Predictor, load_trained_model

    model, cfg = load_trained_model(run_dir)
    x = tf.constant(_image(64, 64, 5)[None], tf.float32)
    a = model(x, training=False)
    b = model(tf.reverse(x, axis=[2]), training=False)
    root_b, disp_b = flip_maps(b["root"], b["disp"], cfg.skeleton)
    by_hand = decode((a["root"] + root_b) / 2, (a["disp"] + disp_b) / 2, cfg.skeleton, cfg.spr)
    got = Predictor(model, cfg, flip=True)(x)
    np.testing.assert_allclose(got.poses.numpy(), by_hand.poses.numpy(), atol=1e-3)
    np.testing.assert_allclose(got.scores.numpy(), by_hand.scores.numpy(), atol=1e-6)


def test_scales_average_maps_brought_to_the_scale_1_map(run_dir):
    """Scale 2 alone: the input resized x2, its maps resized back to the 16x16 maps with the
    displacements halved, decoded with the training Z."""
    from nets.spr import decode
    from utils.predict import Predictor, load_trained_model

    model, cfg = load_trained_model(run_dir)
    x = tf.constant(_image(64, 64, 6)[None], tf.float32)
    out = model(tf.image.resize(x, (128, 128), method="bilinear"), training=False)
    root = tf.image.resize(out["root"], (16, 16), method="bilinear")
    disp = tf.image.resize(out["disp"], (16, 16), method="bilinear") * 0.5
    by_hand = decode(root, disp, cfg.skeleton, cfg.spr)
    got = Predictor(model, cfg, scales=(2.0,))(x)
    np.testing.assert_allclose(got.poses.numpy(), by_hand.poses.numpy(), atol=1e-3)
    both = Predictor(model, cfg, scales=(1.0, 2.0))(x)
    assert np.isfinite(both.poses.numpy()).all() and int(both.num_people[0]) == 8


def test_long_side_keeps_the_aspect_ratio_and_maps_back_to_the_image(run_dir):
    from dataset.letterbox import letterbox_params, to_network
    from utils.predict import Predictor, input_size, load_trained_model, predict_images

    assert input_size(480, 640, 256) == (192, 256) and input_size(100, 50, 64) == (64, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        input_size(10, 10, 100)
    model, cfg = load_trained_model(run_dir)
    image = _image(96, 160, 7)
    pred, = predict_images(Predictor(model, cfg), [image], long_side=160)
    # roots are output-cell centres of the 96x160 network input, mapped back to the image
    cells = to_network(pred.roots, letterbox_params(96, 160, 96, 160)) / 4 - 0.5
    np.testing.assert_allclose(cells, np.round(cells), atol=1e-3)
    assert len(cells) == 8 and cells.min() >= 0 and cells[:, 0].max() < 40 and cells[:, 1].max() < 24
    # the same picture through the square 64x64 input is another prediction
    square, = predict_images(Predictor(model, cfg), [image])
    assert not np.allclose(np.sort(square.roots, axis=0), np.sort(pred.roots, axis=0))
