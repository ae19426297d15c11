import numpy as np
import pytest

from dataset.letterbox import letterbox_image, letterbox_params, letterbox_tf, to_network, to_original


@pytest.mark.parametrize("h, w", [(480, 640), (640, 480), (333, 1001), (512, 512), (100, 60)])
def test_params_and_inverse(h, w):
    lb = letterbox_params(h, w, 256, 192)
    assert lb.new_h <= 256 and lb.new_w <= 192
    assert lb.new_h == 256 or lb.new_w == 192          # one side fills the canvas
    assert abs(lb.scale_x - lb.scale_y) < 2.0 / min(h, w)  # aspect kept up to rounding
    pts = np.random.default_rng(0).uniform(0, [w, h], size=(7, 2))
    back = to_original(to_network(pts, lb), lb)
    np.testing.assert_allclose(back, pts, atol=1e-9)
    # the image corners map onto the pasted region
    np.testing.assert_allclose(to_network(np.array([[0, 0], [w, h]]), lb),
                               [[lb.pad_x, lb.pad_y], [lb.pad_x + lb.new_w, lb.pad_y + lb.new_h]])


def test_keypoint_stays_on_its_pixel():
    img = np.zeros((300, 500, 3), np.uint8)
    spots = [(37, 201), (420, 18), (250, 150)]
    lb = letterbox_params(300, 500, 256, 256)
    for x, y in spots:
        img[:] = 0
        img[y - 3:y + 4, x - 3:x + 4] = 255
        out = letterbox_image(img, lb)
        (cx, cy), = to_network(np.array([[x + 0.5, y + 0.5]]), lb)  # centre of the painted pixel
        ys, xs = np.nonzero(out[..., 0] > 100)
        assert abs(xs.mean() + 0.5 - cx) < 1.0 and abs(ys.mean() + 0.5 - cy) < 1.0


def test_tf_letterbox_matches_numpy():
    import tensorflow as tf

    import cv2

    rng = np.random.default_rng(1)
    for h, w in [(300, 500), (97, 41), (1080, 1920), (37, 61), (64, 64)]:
        img = cv2.GaussianBlur(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8), (0, 0), 1.0)
        lb = letterbox_params(h, w, 128, 128)
        out_tf, params = letterbox_tf(tf.constant(img), 128, 128)
        np.testing.assert_allclose(params.numpy(), lb.as_array(), rtol=1e-6)
        out_np = letterbox_image(img, lb).astype(np.float32)
        assert out_tf.shape == (128, 128, 3)
        # same pasted region (padding exactly zero in both) and similar content
        region = np.zeros((128, 128), bool)
        region[lb.pad_y:lb.pad_y + lb.new_h, lb.pad_x:lb.pad_x + lb.new_w] = True
        assert np.all(out_np[~region] == 0) and np.all(out_tf.numpy()[~region] == 0)
        # the same resize as OpenCV's (area when shrinking, bilinear otherwise), to 1 grey level
        assert np.abs(out_tf.numpy() - out_np).max() <= 1.0


def test_empty_image_is_refused():
    with pytest.raises(ValueError, match="empty image"):
        letterbox_params(0, 10, 64, 64)
