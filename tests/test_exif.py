"""One EXIF rule everywhere (dataset/exif.py, dataset.pipeline.read_image): photos as a viewer
shows them, in the Python tools and in the SavedModel; annotated pictures in the pixels the
annotation's size refers to."""

import json
import os
import struct

import cv2
import numpy as np
import pytest

from training_helpers import random_head_run, run_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jpeg_with_orientation(rgb: np.ndarray, orientation: int, little: bool = False) -> bytes:
    """JPEG bytes of ``rgb`` (stored pixels) with an APP1 Exif block whose IFD0 holds an
    unrelated tag and then Orientation, after the JFIF APP0 block OpenCV writes."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    data = data.tobytes()
    e = "<" if little else ">"
    entries = [struct.pack(e + "HHI4s", 0x010F, 2, 4, b"cam\0"),            # Make, ASCII
               struct.pack(e + "HHIH2x", 0x0112, 3, 1, orientation)]        # Orientation, SHORT
    tiff = (b"II" if little else b"MM") + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", len(entries)) \
        + b"".join(entries) + struct.pack(e + "I", 0)
    body = b"Exif\0\0" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    app0_end = 4 + struct.unpack(">H", data[4:6])[0]                           # SOI + APP0
    return data[:app0_end] + app1 + data[app0_end:]


def _picture(h=60, w=100, seed=0):
    """Smooth and asymmetric (a gradient and a corner block), so that every orientation differs."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([255 * xx / w, 255 * yy / h, np.full((h, w), 80.0)], axis=-1)
    rgb[:15, :25] = (250, 20, 20)
    return rgb.astype(np.uint8)


@pytest.mark.parametrize("little", [False, True])
def test_the_graph_decodes_every_orientation_as_opencv_does(little):
    import tensorflow as tf
    from dataset.exif import decode_photo, exif_orientation

    rgb = _picture()
    for orientation in range(1, 9):
        blob = jpeg_with_orientation(rgb, orientation, little)
        want = cv2.cvtColor(cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert int(exif_orientation(tf.constant(blob))) == orientation
        got = decode_photo(tf.constant(blob)).numpy()
        assert got.shape == want.shape, orientation
        assert np.abs(got.astype(int) - want).max() <= 1, orientation
    assert want.shape[:2] == (100, 60)                                  # 8: turned, as a viewer shows it
    # no Exif, a PNG, and garbage after the markers give orientation 1
    ok, png = cv2.imencode(".png", rgb)
    plain = cv2.imencode(".jpg", rgb)[1].tobytes()
    for blob in (png.tobytes(), plain, plain[:40], b"\xff\xd8\xff\xe1\x00"):
        assert int(exif_orientation(tf.constant(blob))) == 1


def test_annotated_pictures_use_the_pixels_of_the_annotated_size(tmp_path):
    """A stored 100x60 picture with orientation 6: annotated 100x60 (COCO's sizes are the stored
    pixels) it is read as stored; annotated 60x100 as turned; unannotated (AI Challenger, the
    tools) as a viewer shows it; annotated 80x80 it is refused naming both sizes."""
    from dataset.pipeline import ImageError, read_image, read_rgb

    rgb = _picture()
    path = tmp_path / "portrait.jpg"
    path.write_bytes(jpeg_with_orientation(rgb, 6))
    stored = read_image(str(path), (60, 100), rgb=True)
    assert stored.shape[:2] == (60, 100) and np.abs(stored.astype(int) - rgb).mean() < 2
    turned = read_image(str(path), (100, 60), rgb=True)
    np.testing.assert_array_equal(turned, np.rot90(stored, k=3))
    np.testing.assert_array_equal(read_rgb(str(path)), turned)
    with pytest.raises(ImageError, match=r"size differs from the annotation.*100x60 on disk, 80x80 annotated"):
        read_image(str(path), (80, 80))


def test_a_portrait_photo_gives_the_same_poses_in_the_tool_and_the_saved_model(tmp_path):
    """Orientation 6 through ``spm_model_test.py --json`` and through the SavedModel's
    ``serving_default``: the same people in the same (viewer's) pixels."""
    import tensorflow as tf
    from utils import export, predict

    run = str(tmp_path / "run")
    random_head_run(run, score_threshold=0.0, max_people=8, nms_window=3)
    photos = tmp_path / "photos"
    photos.mkdir()
    blob = jpeg_with_orientation(np.random.default_rng(3).integers(0, 255, (60, 100, 3), dtype=np.uint8), 6)
    (photos / "portrait.jpg").write_bytes(blob)
    out_json = tmp_path / "poses.json"
    r = run_tool("spm_model_test", "--ckpt", run, "--imgs", photos, "--output", tmp_path / "drawn",
                 "--json", out_json, "--score", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    people = json.load(open(out_json))[0]["keypoint_annotations"]
    tool = np.array(list(people.values())).reshape(len(people), -1, 3)[..., :2]
    model, cfg = predict.load_trained_model(run)
    serve = tf.saved_model.load(export.export_saved_model(model, cfg, str(tmp_path / "sm"))).signatures[
        export.SIGNATURE]
    got = {k: v.numpy() for k, v in serve(images=tf.constant([blob])).items()}
    n = int(got["num_people"][0])
    assert n == len(tool) == 8
    served = got["poses"][0, :n]
    stored = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    assert stored.shape[:2] == (60, 100)
    unturned, = predict.predict_images(predict.Predictor(model, cfg), [stored])    # what ignoring EXIF gives
    assert np.abs(np.sort(unturned.poses.reshape(-1)) - np.sort(served.reshape(-1))).max() > 1.0
    # the graph's JPEG decode and letterbox agree with OpenCV's to a grey level: a quarter pixel
    for pose in tool:
        assert np.abs(served - pose).reshape(n, -1).max(axis=1).min() < 0.25
