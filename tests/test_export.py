"""Exports give the same poses as the Python inference path."""

import functools
import json
import os

import numpy as np
import pytest

from training_helpers import random_head_run, run_tool


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with a tiny model whose output layers are random, so its maps have
    distinct peaks (an untrained model's are flat), and a decoder that keeps every peak."""
    d = str(tmp_path_factory.mktemp("run"))
    random_head_run(d, score_threshold=0.0, max_people=8, nms_window=3)
    return d


def _python_path(run_dir, image):
    from utils import predict

    model, cfg = predict.load_trained_model(run_dir)
    prediction, = predict.predict_images(predict.Predictor(model, cfg), [image])
    return prediction, cfg


def _image(h, w, seed=1):
    return np.random.default_rng(seed).integers(0, 255, size=(h, w, 3), dtype=np.uint8)


def _jpeg(image):
    import cv2

    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return data.tobytes()


FLIP_SCALES = dict(flip=True, scales=(1.0, 1.5))


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """``tools/export.py --flip --scales 1,1.5`` of the run, once for the tests below: the
    SavedModel (both signatures carry flip and both scales) and spm.tflite. (``--onnx``, of a
    model with the preset's three heads: test_heatmaps.py.)"""
    out = tmp_path_factory.mktemp("exported")
    r = run_tool("export", "--ckpt", run_dir, "--out", out, "--flip", "--scales", "1,1.5")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@functools.lru_cache(maxsize=None)
def _loaded(path):
    """The SavedModel at ``path``, loaded once for the tests below."""
    import tensorflow as tf

    return tf.saved_model.load(path)


def _served(exported, signature, images):
    import tensorflow as tf

    serve = _loaded(str(exported / "saved_model")).signatures[signature]
    return {k: v.numpy() for k, v in serve(images=tf.constant(images)).items()}


def test_export_command_line_writes_each_format(exported):
    assert sorted(os.listdir(exported)) == ["saved_model", "spm.tflite", "spm.tflite.json"]
    assert json.load(open(exported / "spm.tflite.json"))["decoder_inside"]        # TFLite takes the SPR decoder


def test_saved_model_takes_a_batch_of_jpeg_bytes_of_different_sizes(run_dir, exported):
    """serving_default of the --flip --scales 1,1.5 export: three JPEG byte strings of three
    sizes in one call give each image's poses in its own pixels, those of the Python path
    (OpenCV decode, Predictor(flip=True, scales=(1, 1.5)): each scale letterboxed from the
    original picture) to 1/20 px, and not those of scale 1 alone."""
    import cv2
    from utils import export, predict

    model, cfg = predict.load_trained_model(run_dir)
    blobs = [_jpeg(_image(h, w, seed)) for seed, (h, w) in enumerate([(64, 64), (90, 150), (160, 100)])]
    got = _served(exported, export.SIGNATURE, blobs)
    assert got["poses"].shape == (3, cfg.spr.max_people, cfg.skeleton.num_joints, 2)
    images = [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
              for b in blobs]
    wanted = predict.predict_images(predict.Predictor(model, cfg, **FLIP_SCALES), images)
    flipped_only = predict.predict_images(predict.Predictor(model, cfg, flip=True), images)
    scales_only = predict.predict_images(predict.Predictor(model, cfg, scales=(1.0, 1.5)), images)
    for b, want in enumerate(wanted):
        n = int(got["num_people"][b])
        assert n == len(want.poses) == 8
        _assert_same_people(got["poses"][b, :n], want.poses, atol=5e-2)
        assert np.all(got["poses"][b, n:] == 0)
        assert got["poses"][b, :n, :, 0].max() > images[b].shape[1] / 4          # image pixels, not network
        assert np.abs(want.poses - flipped_only[b].poses).max() > 0.5            # the second scale counts
        assert np.abs(want.poses - scales_only[b].poses).max() > 0.1             # and so does the flip


def test_saved_model_pixels_signature_equals_the_encoded_one(exported):
    """The ``images`` (uint8) signature on a batch of pixels == ``serving_default`` on the same
    pixels as PNG bytes (lossless): one graph behind both, flip and scales included."""
    import cv2
    from utils import export

    images = np.stack([_image(64, 64, seed) for seed in (3, 4)])
    pixels = _served(exported, export.IMAGES_SIGNATURE, images)
    pngs = [cv2.imencode(".png", cv2.cvtColor(im, cv2.COLOR_RGB2BGR))[1].tobytes() for im in images]
    encoded = _served(exported, export.SIGNATURE, pngs)
    np.testing.assert_array_equal(pixels["num_people"], encoded["num_people"])
    assert pixels["num_people"].min() > 0
    np.testing.assert_allclose(pixels["poses"], encoded["poses"], atol=1e-4)


def _assert_same_people(got, want, atol=1e-2):
    """Every wanted pose [J, 2] is one of ``got``'s first ``len(want)`` poses within ``atol``:
    people whose root scores tie to float precision may come out of top-k in either order."""
    got = np.asarray(got)[:len(want)]
    for i, pose in enumerate(np.asarray(want)):
        err = np.abs(got - pose).reshape(len(got), -1).max(axis=1)
        assert err.min() <= atol + 1e-4 * np.abs(pose).max(), (i, err.min())


def test_tflite_gives_the_python_poses_on_the_letterbox(run_dir, exported):
    """spm.tflite (LiteRT) of the command-line export: the Python path's single-scale poses on
    the letterboxed 90x150 picture, in network-input pixels. (spm.onnx: test_heatmaps.py.)"""
    from dataset.letterbox import letterbox_image, letterbox_params, to_network
    from utils import export

    image = _image(90, 150, seed=4)
    meta = json.load(open(exported / "spm.tflite.json"))
    lb = letterbox_params(90, 150, *meta["input"][1:3])
    x = letterbox_image(image, lb)[None].astype(np.float32)
    want, cfg = _python_path(run_dir, image)
    assert len(want.poses) == 8
    interp = export.tflite_interpreter(str(exported / "spm.tflite"))
    assert type(interp).__module__.startswith("ai_edge_litert")          # LiteRT, not tf.lite
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    outs = [interp.get_tensor(d["index"]) for d in interp.get_output_details()]
    poses = next(v for v in outs if v.ndim == 4 and v.shape[-1] == 2)
    assert int(next(v for v in outs if v.shape == (1,))[0]) == 8            # num_people
    _assert_same_people(poses[0], to_network(want.poses, lb), atol=2e-2)


def test_checkpoint_of_another_skeleton_is_refused(run_dir):
    from utils import predict

    with pytest.raises(ValueError, match="ai_challenger skeleton .* need the coco skeleton"):
        predict.load_trained_model(run_dir, expect_skeleton="coco")
