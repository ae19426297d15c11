"""Exports give the same poses as the Python inference path."""

import json
import os

import numpy as np
import pytest

from training_helpers import random_head_run


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


def test_saved_model_takes_a_batch_of_jpeg_bytes_of_different_sizes(run_dir, tmp_path):
    """serving_default: three JPEG byte strings of three sizes in one call give each image's
    poses in its own pixels, those of the Python path (OpenCV decode and letterbox) to 1/50 px."""
    import cv2
    import tensorflow as tf
    from utils import export, predict

    model, cfg = predict.load_trained_model(run_dir)
    out = export.export_saved_model(model, cfg, str(tmp_path / "sm"))
    serve = tf.saved_model.load(out).signatures[export.SIGNATURE]
    blobs = [_jpeg(_image(h, w, seed)) for seed, (h, w) in enumerate([(64, 64), (50, 90), (150, 120)])]
    got = {k: v.numpy() for k, v in serve(images=tf.constant(blobs)).items()}
    assert got["poses"].shape == (3, cfg.spr.max_people, cfg.skeleton.num_joints, 2)
    predictor = predict.Predictor(model, cfg)
    for b, blob in enumerate(blobs):
        image = cv2.cvtColor(cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        want, = predict.predict_images(predictor, [image])
        n = int(got["num_people"][b])
        assert n == len(want.poses) == 8
        _assert_same_people(got["poses"][b, :n], want.poses, atol=2e-2)           # 1/50 px
        assert np.all(got["poses"][b, n:] == 0)
        assert got["poses"][b, :n, :, 0].max() > image.shape[1] / 4              # image pixels, not network


def test_saved_model_flip_and_pixels_signature_equal_the_predictor(run_dir, tmp_path):
    """The ``images`` (uint8) signature of a --flip export equals Predictor(flip=True)."""
    import tensorflow as tf
    from utils import export, predict

    model, cfg = predict.load_trained_model(run_dir)
    out = export.export_saved_model(model, cfg, str(tmp_path / "sm_flip"), flip=True)
    serve = tf.saved_model.load(out).signatures[export.IMAGES_SIGNATURE]
    images = np.stack([_image(64, 64, seed) for seed in (3, 4)])
    got = {k: v.numpy() for k, v in serve(images=tf.constant(images)).items()}
    wanted = predict.predict_images(predict.Predictor(model, cfg, flip=True), list(images))
    plain = predict.predict_images(predict.Predictor(model, cfg), list(images))
    for b, want in enumerate(wanted):
        n = int(got["num_people"][b])
        assert n == len(want.poses)
        _assert_same_people(got["poses"][b, :n], want.poses, atol=2e-2)
        # flipping changed the answer
        assert len(want.poses) != len(plain[b].poses) or np.abs(want.poses - plain[b].poses).max() > 0.1


def test_saved_model_multi_scale_letterboxes_the_original_as_the_predictor_does(run_dir, tmp_path):
    """serving_default of a --scales 1,1.5 export on JPEGs of two shapes: the poses of
    Predictor(scales=(1, 1.5)) (each scale from the original picture), not those of scale 1."""
    import cv2
    import tensorflow as tf
    from utils import export, predict

    model, cfg = predict.load_trained_model(run_dir)
    out = export.export_saved_model(model, cfg, str(tmp_path / "sm_ms"), scales=(1.0, 1.5))
    serve = tf.saved_model.load(out).signatures[export.SIGNATURE]
    blobs = [_jpeg(_image(h, w, seed)) for seed, (h, w) in enumerate([(90, 150), (160, 100)])]
    got = {k: v.numpy() for k, v in serve(images=tf.constant(blobs)).items()}
    images = [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
              for b in blobs]
    wanted = predict.predict_images(predict.Predictor(model, cfg, scales=(1.0, 1.5)), images)
    plain = predict.predict_images(predict.Predictor(model, cfg), images)
    for b, want in enumerate(wanted):
        n = int(got["num_people"][b])
        assert n == len(want.poses) == 8
        _assert_same_people(got["poses"][b, :n], want.poses, atol=5e-2)
        assert np.abs(want.poses - plain[b].poses).max() > 0.5


def _assert_same_people(got, want, atol=1e-2):
    """Every wanted pose [J, 2] is one of ``got``'s first ``len(want)`` poses within ``atol``:
    people whose root scores tie to float precision may come out of top-k in either order."""
    got = np.asarray(got)[:len(want)]
    for i, pose in enumerate(np.asarray(want)):
        err = np.abs(got - pose).reshape(len(got), -1).max(axis=1)
        assert err.min() <= atol + 1e-4 * np.abs(pose).max(), (i, err.min())


def test_tflite_matches_python_path(run_dir, tmp_path):
    import tensorflow as tf
    from utils import export, predict

    model, cfg = predict.load_trained_model(run_dir)
    path = str(tmp_path / "spm.tflite")
    meta = export.export_tflite(model, cfg, path)
    assert json.load(open(path + ".json"))["decoder_inside"] == meta["decoder_inside"]
    assert meta["decoder_inside"], meta.get("decoder_error")   # TFLite takes the SPR decoder
    interp = export.tflite_interpreter(path)
    assert type(interp).__module__.startswith("ai_edge_litert")          # LiteRT, not tf.lite
    image = _image(64, 64, seed=2)
    interp.set_tensor(interp.get_input_details()[0]["index"], image[None].astype(np.float32))
    interp.invoke()
    outs = {d["name"]: interp.get_tensor(d["index"]) for d in interp.get_output_details()}
    want, cfg = _python_path(run_dir, image)
    if meta["decoder_inside"]:
        poses = next(v for k, v in outs.items() if v.ndim == 4 and v.shape[-1] == 2)
        _assert_same_people(poses[0], want.poses)
    else:
        from nets.spr import decode

        root = next(v for v in outs.values() if v.shape[-1] == 1)
        disp = next(v for v in outs.values() if v.shape[-1] == 2 * cfg.skeleton.num_joints)
        dec = decode(tf.constant(root), tf.constant(disp), cfg.skeleton, cfg.spr)
        _assert_same_people(dec.poses.numpy()[0], want.poses)


def test_export_command_line_flip_scales_tflite_and_onnx_give_the_python_poses(run_dir, tmp_path):
    """``tools/export.py --flip --scales 1,1.5 --onnx``: the SavedModel carries flip and both
    scales (the poses of Predictor(flip=True, scales=(1, 1.5)) on a 90x150 JPEG); spm.tflite
    (LiteRT) and spm.onnx (onnxruntime) give the Python path's single-scale poses on the
    letterbox, in network-input pixels."""
    import subprocess
    import sys

    import cv2
    import onnxruntime
    import tensorflow as tf
    from dataset.letterbox import letterbox_image, letterbox_params, to_network
    from training_helpers import subprocess_env
    from utils import export, predict

    out = tmp_path / "exported"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "tools", "export.py"), "--ckpt", run_dir, "--out", str(out),
                        "--flip", "--scales", "1,1.5", "--onnx"], capture_output=True, text=True,
                       env=subprocess_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["saved_model", "spm.onnx", "spm.onnx.json", "spm.tflite", "spm.tflite.json"]
    image = _image(90, 150, seed=4)
    blob = _jpeg(image)
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    model, cfg = predict.load_trained_model(run_dir)
    both, = predict.predict_images(predict.Predictor(model, cfg, flip=True, scales=(1.0, 1.5)), [decoded])
    served = tf.saved_model.load(str(out / "saved_model")).signatures[export.SIGNATURE](images=tf.constant([blob]))
    n = int(served["num_people"][0])
    assert n == len(both.poses) == 8
    _assert_same_people(served["poses"][0, :n].numpy(), both.poses, atol=5e-2)

    meta = json.load(open(out / "spm.onnx.json"))
    lb = letterbox_params(90, 150, *meta["input"][1:3])
    x = letterbox_image(image, lb)[None].astype(np.float32)
    want, cfg = _python_path(run_dir, image)
    session = onnxruntime.InferenceSession(str(out / "spm.onnx"))
    assert [i.name for i in session.get_inputs()] == ["images"]
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": x})))
    assert int(got["num_people"][0]) == len(want.poses) == 8
    _assert_same_people(got["poses"][0, :8], to_network(want.poses, lb), atol=1e-3)
    interp = export.tflite_interpreter(str(out / "spm.tflite"))
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    poses = next(v for v in (interp.get_tensor(d["index"]) for d in interp.get_output_details())
                 if v.ndim == 4 and v.shape[-1] == 2)
    _assert_same_people(poses[0], to_network(want.poses, lb), atol=2e-2)


def test_checkpoint_of_another_skeleton_is_refused(run_dir):
    from utils import predict

    with pytest.raises(ValueError, match="ai_challenger skeleton .* need the coco skeleton"):
        predict.load_trained_model(run_dir, expect_skeleton="coco")
