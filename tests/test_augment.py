"""imgaug augmentation: keypoints stay on their pixels, flips relabel the sides, seeds decide."""

import dataclasses

import numpy as np

from config import get_preset
from config.config import AugmentConfig
from dataset.augment import Augmenter
from config.skeletons import VIS_UNLABELLED, VIS_VISIBLE

CFG = get_preset("tiny_synthetic")
SKELETON = CFG.skeleton
J = SKELETON.num_joints


def _no_colour(**geometry) -> AugmentConfig:
    """Geometry only (identity unless overridden), colour off."""
    base = dict(rotation_deg=0.0, scale_min=1.0, scale_max=1.0, translate_frac=0.0, flip_prob=0.0,
                color_mul_min=1.0, color_mul_max=1.0, grayscale_prob=0.0)
    return dataclasses.replace(AugmentConfig(), **{**base, **geometry})


def _centroid(channel: np.ndarray):
    """Intensity-weighted centre of a painted dot in continuous coordinates (pixel i = [i, i+1))."""
    g = channel.astype(np.float64)
    ys, xs = np.mgrid[0:g.shape[0], 0:g.shape[1]]
    return (g * (xs + 0.5)).sum() / g.sum(), (g * (ys + 0.5)).sum() / g.sum()


def test_keypoint_stays_on_its_painted_dot():
    """Full default ranges (rotation, scale, shift, flip, colour): the dot follows the keypoint."""
    aug = Augmenter(CFG.augment, SKELETON)
    H, W = 96, 128
    rng = np.random.default_rng(0)
    checked = 0
    for seed in range(40):
        x, y = int(rng.integers(30, 98)), int(rng.integers(25, 71))
        image = np.zeros((H, W, 3), np.uint8)
        image[y - 1:y + 2, x - 1:x + 2] = 255                    # 3x3 dot centred on pixel (x, y)
        kps = np.zeros((1, J, 3), np.float32)
        kps[0, :, :2] = (x + 0.5, y + 0.5)                       # every joint at the dot centre
        kps[0, :, 2] = VIS_VISIBLE
        out = aug(image, kps, np.array([[x - 5, y - 5, x + 5, y + 5]], np.float32), seed)
        if out.image.max() < 100:                                # dot pushed out of the picture
            assert np.all(out.keypoints[0, :, 2] == VIS_UNLABELLED)
            continue
        cx, cy = _centroid(out.image.max(axis=2))
        assert np.all(out.keypoints[0, :, 2] == VIS_VISIBLE)
        assert np.hypot(out.keypoints[0, 0, 0] - cx, out.keypoints[0, 0, 1] - cy) < 1.0, seed
        checked += 1
    assert checked >= 30


def test_flip_swaps_left_and_right_joints():
    """A mirrored person's right wrist is where the mirror image of their left wrist is.

    The person's right wrist is painted red at x = 30; after mirroring the picture that red
    wrist is at W - 30 and is the person's *left* wrist (a mirror swaps anatomical sides).
    """
    W, H = 128, 64
    rw, lw = SKELETON.index("right_wrist"), SKELETON.index("left_wrist")
    image = np.zeros((H, W, 3), np.uint8)
    image[19:22, 29:32, 0] = 255                                  # red dot: right wrist, pixel (30, 20)
    kps = np.zeros((1, J, 3), np.float32)
    kps[0, rw] = (30.5, 20.5, VIS_VISIBLE)
    kps[0, lw] = (90.5, 40.5, VIS_VISIBLE)
    box = np.array([[20, 10, 100, 50]], np.float32)
    out = Augmenter(_no_colour(flip_prob=1.0), SKELETON)(image, kps, box, seed=1)
    assert out.flipped
    np.testing.assert_allclose(out.keypoints[0, rw], (W - 90.5, 40.5, VIS_VISIBLE), atol=1e-4)
    np.testing.assert_allclose(out.keypoints[0, lw], (W - 30.5, 20.5, VIS_VISIBLE), atol=1e-4)
    cx, cy = _centroid(out.image[..., 0])
    assert abs(cx - out.keypoints[0, lw, 0]) < 0.5 and abs(cy - out.keypoints[0, lw, 1]) < 0.5
    np.testing.assert_allclose(out.boxes[0], (W - 100, 10, W - 20, 50), atol=1e-4)
    # every other joint moved to its flip partner's index
    others = [j for j in range(J) if j not in (rw, lw)]
    assert np.all(out.keypoints[0, others] == 0)
    same = Augmenter(_no_colour(flip_prob=0.0), SKELETON)(image, kps, box, seed=1)
    assert not same.flipped and np.array_equal(same.keypoints, kps)


def test_zoom_matches_hand_computed_affine_and_drops_joints_outside():
    """Scale 2 about the centre (64, 64) of a 128 x 128 input: x' = 64 + 2 (x - 64)."""
    image = np.zeros((128, 128, 3), np.uint8)
    kps = np.zeros((1, J, 3), np.float32)
    kps[0, :, :2] = (70.0, 60.0)
    kps[0, :, 2] = VIS_VISIBLE
    kps[0, 0] = (5.0, 5.0, VIS_VISIBLE)                          # -> (-54, -54): outside
    mask = np.zeros((128, 128), bool)
    mask[48:80, 48:80] = True                                    # -> [32, 96) after the zoom
    out = Augmenter(_no_colour(scale_min=2.0, scale_max=2.0), SKELETON)(
        image, kps, np.array([[40, 40, 80, 80]], np.float32), seed=3, mask=mask)
    assert out.keypoints[0, 0, 2] == VIS_UNLABELLED and np.all(out.keypoints[0, 0, :2] == 0)
    np.testing.assert_allclose(out.keypoints[0, 1:, :2], np.tile([76.0, 56.0], (J - 1, 1)), atol=1e-3)
    np.testing.assert_allclose(out.boxes[0], (16, 16, 96, 96), atol=1e-3)
    ys, xs = np.nonzero(out.mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (32, 95, 32, 95)


def test_same_seed_same_result_other_seed_differs():
    aug = Augmenter(CFG.augment, SKELETON)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    kps = np.concatenate([rng.uniform(20, 60, (2, J, 2)), np.full((2, J, 1), VIS_VISIBLE)], -1).astype(np.float32)
    boxes = np.array([[10, 10, 50, 50], [30, 20, 70, 60]], np.float32)
    a, b, c = aug(image, kps, boxes, 7), aug(image, kps, boxes, 7), aug(image, kps, boxes, 8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.keypoints, b.keypoints)
    assert not np.array_equal(a.keypoints, c.keypoints)
    # inputs are not modified in place
    assert np.all(kps[..., 2] == VIS_VISIBLE)


def test_letterbox_and_augmentation_in_one_warp_keep_dots_on_keypoints():
    """Photographs larger and smaller than the input, letterboxed by the augmentation's warp
    (halvings included for the large one): painted dots land on the augmented keypoints."""
    from dataset.letterbox import letterbox_params, to_network

    aug = Augmenter(CFG.augment, SKELETON)
    rng = np.random.default_rng(5)
    checked = 0
    for seed, (h, w) in enumerate([(700, 1000), (900, 600), (100, 150)] * 10):
        x, y = int(rng.uniform(0.3, 0.7) * w), int(rng.uniform(0.3, 0.7) * h)
        r = max(2, int(round(max(h, w) / 128 * 1.5)))           # a dot of about 3 network pixels
        image = np.zeros((h, w, 3), np.uint8)
        image[y - r:y + r + 1, x - r:x + r + 1] = 255
        lb = letterbox_params(h, w, 128, 128)
        kps = np.zeros((1, J, 3), np.float32)
        kps[0, :, :2] = to_network(np.array([x + 0.5, y + 0.5]), lb)
        kps[0, :, 2] = VIS_VISIBLE
        box = to_network(np.array([[x - r, y - r], [x + r + 1, y + r + 1]]), lb).reshape(1, 4)
        out = aug(image, kps, box.astype(np.float32), seed, letterbox=lb)
        assert out.image.shape == (128, 128, 3)
        if out.keypoints[0, 0, 2] == VIS_UNLABELLED or out.image.max() < 100:
            continue
        cx, cy = _centroid(out.image.max(axis=2))
        assert np.hypot(out.keypoints[0, 0, 0] - cx, out.keypoints[0, 0, 1] - cy) < 0.5, seed
        checked += 1
    assert checked >= 25


def test_identity_warp_equals_the_test_time_letterbox():
    """No augmentation: the one warp reproduces letterbox_image (INTER_AREA / bilinear) closely,
    for a shrink by less than 2, a shrink by more than 2 (halvings) and an enlargement."""
    import cv2

    from dataset.letterbox import letterbox_image, letterbox_params

    aug = Augmenter(_no_colour(), SKELETON)
    rng = np.random.default_rng(0)
    for h, w in [(200, 160), (700, 520), (60, 90)]:
        # smooth content: features of about 4 network pixels whatever the picture's size
        cells = 128 // 4
        small = rng.integers(0, 255, (cells, cells, 3)).astype(np.uint8)
        image = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        lb = letterbox_params(h, w, 128, 128)
        out = aug(image, np.zeros((0, J, 3)), np.zeros((0, 4)), 0, letterbox=lb)
        ref = letterbox_image(image, lb)
        inner = (slice(lb.pad_y + 1, lb.pad_y + lb.new_h - 1), slice(lb.pad_x + 1, lb.pad_x + lb.new_w - 1))
        diff = np.abs(out.image[inner].astype(int) - ref[inner].astype(int))
        assert diff.mean() < 1.5 and diff.max() <= 16, (h, w, diff.mean(), diff.max())
        # the padding stays black (but for the one row or column the bilinear edge blends into)
        assert out.image[:max(0, lb.pad_y - 1)].max(initial=0) == 0
        assert out.image[:, :max(0, lb.pad_x - 1)].max(initial=0) == 0


def test_device_colour_equals_imgaug_multiply_and_grayscale():
    """apply_colour (run in the training step) against imgaug's own operators on uint8: equal
    up to imgaug's rounding to whole grey levels."""
    import imgaug.augmenters as iaa

    from dataset.augment import apply_colour

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
    colour = np.array([[0.8, 0.0], [1.2, 0.0], [1.1, 1.0]], np.float32)
    out = apply_colour(images, colour).numpy()
    for image, (mul, gray), got in zip(images, colour, out):
        ref = iaa.Multiply(float(mul))(image=image)
        if gray:
            ref = iaa.Grayscale(alpha=1.0)(image=ref)
        assert np.abs(got - ref.astype(np.float32)).max() <= 1.0
        assert got.max() <= 255.0


def test_colour_parameters_are_drawn_in_range_and_batches_mix_flips():
    aug = Augmenter(dataclasses.replace(CFG.augment, grayscale_prob=0.5, flip_prob=0.5), SKELETON)
    rng = np.random.default_rng(2)
    count = 16
    images = [np.zeros((64, 64, 3), np.uint8) for _ in range(count)]
    kps = [np.concatenate([rng.uniform(20, 44, (1, J, 2)), np.full((1, J, 1), VIS_VISIBLE)], -1) for _ in range(count)]
    boxes = [np.array([[16, 16, 48, 48]], np.float32)] * count
    outs = aug.augment_batch(images, kps, boxes, seed=11)
    colour = np.array([o.colour for o in outs])
    lo, hi = CFG.augment.color_mul_min, CFG.augment.color_mul_max
    assert np.all((colour[:, 0] >= lo) & (colour[:, 0] <= hi)) and set(colour[:, 1]) == {0.0, 1.0}
    assert {o.flipped for o in outs} == {True, False}
    again = aug.augment_batch(images, kps, boxes, seed=11)
    for a, b in zip(outs, again):
        assert np.array_equal(a.keypoints, b.keypoints) and np.array_equal(a.colour, b.colour)
