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


def test_each_scale_runs_on_the_original_picture_letterboxed_at_its_own_size(run_dir):
    """Scale 2 of a 100x100 picture at the 64x64 input: the network sees the picture letterboxed
    at 128x128 (its pixels, not the 64x64 letterbox blurred up), its 32x32 maps brought back to
    the 16x16 maps with the displacements halved; the earlier resize of the letterbox gives
    other poses."""
    from dataset.letterbox import letterbox_image, letterbox_params
    from nets.spr import decode
    from utils.predict import Predictor, letterbox_scales, load_trained_model, predict_images

    model, cfg = load_trained_model(run_dir)
    picture = _image(100, 100, 6)
    base, base_box, scaled = letterbox_scales(picture, 64, 64, (1.0, 2.0))
    (x2, box2), = scaled
    np.testing.assert_array_equal(x2, letterbox_image(picture, letterbox_params(100, 100, 128, 128)))
    np.testing.assert_array_equal(base, letterbox_image(picture, letterbox_params(100, 100, 64, 64)))
    out = model(tf.constant(x2[None], tf.float32), training=False)
    root = tf.image.resize(out["root"], (16, 16), method="bilinear")   # exact here: 2x, no padding
    disp = tf.image.resize(out["disp"], (16, 16), method="bilinear") * 0.5
    by_hand = decode(root, disp, cfg.skeleton, cfg.spr)
    got, = predict_images(Predictor(model, cfg, scales=(2.0,)), [picture])
    n = int(by_hand.num_people[0])
    assert n == len(got.poses) == 8
    np.testing.assert_allclose(got.poses, by_hand.poses[0, :n].numpy() * 100 / 64, atol=2e-3)
    blurred = model(tf.image.resize(tf.constant(base[None], tf.float32), (128, 128)), training=False)
    old = decode(tf.image.resize(blurred["root"], (16, 16)), tf.image.resize(blurred["disp"], (16, 16)) * 0.5,
                 cfg.skeleton, cfg.spr)
    assert np.abs(old.poses[0, :n].numpy() - by_hand.poses[0, :n].numpy()).max() > 0.5


def _blob_model(images, training=False):
    """A network known in closed form: root = the red channel averaged over 4x4 cells, every
    displacement (4, -2) cells of its own map."""
    root = tf.nn.avg_pool2d(images[..., :1], 4, 4, "VALID") / 255.0
    ones = tf.ones_like(root)
    return {"root": root, "disp": tf.concat([4.0 * ones, -2.0 * ones] * 14, axis=-1)}


@pytest.mark.parametrize("scale", [0.5, 1.3, 2.0])
def test_scale_maps_land_on_the_scale_1_map_whatever_the_rounding(scale):
    """A bright blob at a known place of a 150x90 picture, base input 64x96: at scale 1.3 the
    input is 96x128 (another aspect ratio: other padding), at 0.5 32x64. The scale's root map,
    resampled through the two letterboxes, peaks where the scale-1 map does (centroids within a
    tenth of a cell), and its displacements are the scale's (4, -2) in scale-1 cells."""
    from config.skeletons import get_skeleton
    from utils.predict import letterbox_scales, network_maps

    yy, xx = np.mgrid[0:90, 0:150]
    picture = np.zeros((90, 150, 3), np.uint8)
    picture[..., 0] = (255 * np.exp(-((xx - 100.0) ** 2 + (yy - 40.0) ** 2) / (2 * 12.0 ** 2))).astype(np.uint8)
    skeleton = get_skeleton("ai_challenger")
    base, box, scaled = letterbox_scales(picture, 64, 96, (scale,))

    def maps(scales, views):
        root, disp = network_maps(_blob_model, tf.constant(base[None]), skeleton, False, scales,
                                  tf.constant(box.as_array()[None]),
                                  [(tf.constant(x[None]), tf.constant(b.as_array()[None])) for x, b in views])
        return root.numpy()[0, ..., 0], disp.numpy()[0]

    ref, _ = maps((1.0,), [])
    got, disp = maps((scale,), scaled)
    assert got.shape == ref.shape == (16, 24)

    def centroid(m):
        w = np.clip(m - 0.3 * m.max(), 0, None)
        gy, gx = np.mgrid[0:m.shape[0], 0:m.shape[1]]
        return np.array([(w * gx).sum(), (w * gy).sum()]) / w.sum()

    np.testing.assert_allclose(centroid(got), centroid(ref), atol=0.1)
    a = scaled[0][1].scale_x / box.scale_x, scaled[0][1].scale_y / box.scale_y
    inside = got > 0.2 * got.max()
    np.testing.assert_allclose(disp[inside][:, 0], 4.0 / a[0], rtol=1e-5)
    np.testing.assert_allclose(disp[inside][:, 1], -2.0 / a[1], rtol=1e-5)


def test_multi_scale_needs_each_scale_input(run_dir):
    from utils.predict import Predictor, load_trained_model

    model, cfg = load_trained_model(run_dir)
    with pytest.raises(ValueError, match="letterbox_scales"):
        Predictor(model, cfg, scales=(1.0, 2.0))(tf.zeros([1, 64, 64, 3]))


def test_long_side_keeps_the_aspect_ratio_and_maps_back_to_the_image(run_dir):
    from dataset.letterbox import letterbox_params, to_network
    from utils.predict import Predictor, input_size, load_trained_model, predict_images

    assert input_size(480, 640, 256) == (192, 256) and input_size(100, 50, 64) == (64, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        input_size(10, 10, 100)
    model, cfg = load_trained_model(run_dir)
    image = _image(96, 160, 7)
    predictor = Predictor(model, cfg)
    pred, = predict_images(predictor, [image], long_side=160)
    # roots are output-cell centres of the 96x160 network input, mapped back to the image
    cells = to_network(pred.roots, letterbox_params(96, 160, 96, 160)) / 4 - 0.5
    np.testing.assert_allclose(cells, np.round(cells), atol=1e-3)
    assert len(cells) == 8 and cells.min() >= 0 and cells[:, 0].max() < 40 and cells[:, 1].max() < 24
    # Pictures of other sizes, each at its own input size: the decoder is traced once for all
    # of them (a plain graph; XLA would compile once per size), and decodes as the XLA one does.
    others = predict_images(predictor, [_image(64, 160, 1), _image(160, 96, 2)], long_side=160)
    assert predictor.decoder(any_size=True).experimental_get_tracing_count() == 1
    assert predictor.decode.experimental_get_tracing_count() == 0 and len(others) == 2
    x = image[None].astype(np.float32)                  # the picture fills its 96x160 input
    plain, compiled = (predictor(x, any_size=any_size) for any_size in (True, False))
    assert int(plain.num_people[0]) == int(compiled.num_people[0]) == 8
    np.testing.assert_allclose(plain.poses.numpy(), compiled.poses.numpy(), atol=1e-3)
    # the same picture through the square 64x64 input is another prediction
    square, = predict_images(Predictor(model, cfg), [image])
    assert not np.allclose(np.sort(square.roots, axis=0), np.sort(pred.roots, axis=0))


def test_predict_images_streams_an_iterable_in_batches(run_dir):
    """A generator of 5 pictures of 3 sizes at batch 2: read 2 at a time (the third picture is
    not read before the first prediction is out), and each picture's poses those of a batch of
    one."""
    from utils.predict import Predictor, iter_predictions, load_trained_model, predict_images

    model, cfg = load_trained_model(run_dir)
    predictor = Predictor(model, cfg)
    pictures = [_image(h, w, seed) for seed, (h, w) in enumerate([(64, 64), (50, 90), (150, 120), (64, 64), (70, 40)])]
    read = []

    def lazily():
        for p in pictures:
            read.append(p)
            yield p

    stream = iter_predictions(predictor, lazily(), batch_size=2)
    first = next(stream)
    assert len(read) == 2
    got = [first] + list(stream)
    assert len(read) == len(got) == 5
    for picture, prediction in zip(pictures, got):
        alone, = predict_images(predictor, [picture])
        np.testing.assert_allclose(prediction.poses, alone.poses, atol=1e-3)
