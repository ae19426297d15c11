"""SPR encoder and decoder (nets/spr.py): targets by hand, exact round trips, edge cases.

Small maps (64x64 or 128x128 input, stride 4) keep TensorFlow fast. Expected values are worked
out by hand from the conventions in the module docstring, or are the input keypoints themselves.
"""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from config import SprConfig, get_skeleton
from conftest import AIC_ANNOTATIONS
from nets import spr

SK = get_skeleton("ai_challenger")
J = SK.num_joints
NECK, HEAD = SK.index("neck"), SK.index("head_top")
R_SHOULDER, R_ELBOW, R_WRIST = SK.index("right_shoulder"), SK.index("right_elbow"), SK.index("right_wrist")
L_SHOULDER, L_ELBOW, L_WRIST = SK.index("left_shoulder"), SK.index("left_elbow"), SK.index("left_wrist")


def small_cfg(**kw) -> SprConfig:
    base = dict(output_stride=4, sigma=2.0, tau=3.0, nms_window=3, score_threshold=0.3,
                max_people=6, root_type="centroid", anchor="parent", gather="bilinear", z_norm="diag")
    base.update(kw)
    return SprConfig(**base)


def person(joints: dict) -> np.ndarray:
    """[J, 3] keypoints with the given {joint index: (x, y)} labelled (visible), others unlabelled."""
    kp = np.zeros((J, 3))
    for j, (x, y) in joints.items():
        kp[j] = (x, y, 2)
    return kp


def boxes_of(kps: np.ndarray) -> np.ndarray:
    out = []
    for kp in kps:
        xy = kp[kp[:, 2] > 0, :2]
        out.append([*xy.min(0), *xy.max(0)] if len(xy) else [0, 0, 0, 0])
    return np.array(out, np.float64).reshape(-1, 4)


def random_people(rng, centres, spread=12.0, unlabelled_prob=0.0) -> np.ndarray:
    """People with float joints scattered around the given input-pixel centres."""
    kps = np.zeros((len(centres), J, 3))
    for n, c in enumerate(centres):
        kps[n, :, :2] = np.asarray(c) + rng.uniform(-spread, spread, size=(J, 2))
        kps[n, :, 2] = np.where(rng.random(J) < unlabelled_prob, 0, 2)
    return kps


def decode_np(targets, cfg, batch=True):
    root, disp = targets["root"], targets["disp"]
    if batch:
        root, disp = root[None], disp[None]
    out = spr.decode(tf.constant(root), tf.constant(disp), SK, cfg)
    return out.poses.numpy(), out.scores.numpy(), out.num_people.numpy()


def match(decoded: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """For each true person, the decoded pose with the smallest error on its labelled joints."""
    out = []
    for kp in kps:
        lab = kp[:, 2] > 0
        err = np.abs(decoded[:, lab] - kp[None, lab, :2]).max(axis=(1, 2))
        out.append(decoded[np.argmin(err)])
    return np.array(out)


# ----------------------------------------------------------------------------- targets by hand

@pytest.mark.parametrize("anchor", ["parent", "root"])
def test_targets_worked_by_hand(anchor):
    # neck at input (23, 29) -> map (5.75, 7.25); head at (31, 21) -> (7.75, 5.25)
    kps = person({NECK: (23.0, 29.0), HEAD: (31.0, 21.0)})[None]
    t = spr.encode(kps, boxes_of(kps), SK, small_cfg(anchor=anchor), (64, 64))
    z = math.sqrt(16 ** 2 + 16 ** 2)
    assert t["root"].shape == (16, 16, 1) and t["disp"].shape == (16, 16, 2 * J)
    # centroid (6.75, 6.25) -> root cell (6, 6), peak exactly 1, exp(-d^2/sigma^2) around it
    assert t["root"][6, 6, 0] == 1.0 and t["root"].max() == 1.0
    assert t["root"][6, 7, 0] == pytest.approx(math.exp(-1 / 4), rel=1e-6)
    assert t["root"][8, 8, 0] == pytest.approx(math.exp(-8 / 4), rel=1e-6)
    np.testing.assert_array_equal(t["root_weight"], 1.0)
    # neck hangs from the root in both modes: at the root cell (centre 6.5, 6.5)
    np.testing.assert_allclose(t["disp"][6, 6, 2 * NECK:2 * NECK + 2], [-0.75 / z, 0.75 / z], rtol=1e-6)
    # ... and at cell (x=8, y=6), centre (8.5, 6.5), two cells to the right (inside tau = 3)
    np.testing.assert_allclose(t["disp"][6, 8, 2 * NECK:2 * NECK + 2], [-2.75 / z, 0.75 / z], rtol=1e-6)
    # the disc of radius 3 around a cell centre holds 29 cells (Gauss circle problem, r = 3)
    assert t["disp_weight"][..., 2 * NECK].sum() == 29
    assert t["disp_weight"][6, 10, 2 * NECK] == 0 and t["disp"][6, 10, 2 * NECK] == 0   # distance 4
    if anchor == "parent":   # head written around the neck (5.75, 7.25): cell (5, 7), centre (5.5, 7.5)
        np.testing.assert_allclose(t["disp"][7, 5, 2 * HEAD:2 * HEAD + 2], [2.25 / z, -2.25 / z], rtol=1e-6)
    else:                    # head written around the root cell centre (6.5, 6.5)
        np.testing.assert_allclose(t["disp"][6, 6, 2 * HEAD:2 * HEAD + 2], [1.25 / z, -1.25 / z], rtol=1e-6)
    # nothing else is labelled: every other channel is empty
    others = [c for j in range(J) if j not in (NECK, HEAD) for c in (2 * j, 2 * j + 1)]
    assert not t["disp_weight"][..., others].any() and not t["disp"][..., others].any()


def test_bbox_center_root_and_z_one():
    kps = person({NECK: (23.0, 29.0), HEAD: (31.0, 21.0)})[None]
    boxes = np.array([[40.0, 8.0, 52.0, 20.0]])          # centre (46, 14) -> map (11.5, 3.5)
    t = spr.encode(kps, boxes, SK, small_cfg(root_type="bbox_center", z_norm="one"), (64, 64))
    assert np.unravel_index(t["root"][..., 0].argmax(), (16, 16)) == (3, 11)
    # Z = 1: displacements in output pixels; neck (5.75, 7.25) from cell centre (11.5, 3.5)
    np.testing.assert_allclose(t["disp"][3, 11, 2 * NECK:2 * NECK + 2], [-5.75, 3.75], rtol=1e-6)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("root_type", ["centroid", "bbox_center"])
@pytest.mark.parametrize("anchor", ["parent", "root"])
@pytest.mark.parametrize("gather", ["bilinear", "nearest"])
def test_exact_round_trip_sub_pixel(root_type, anchor, gather):
    rng = np.random.default_rng(7)
    kps = random_people(rng, [(24, 24), (100, 30), (60, 100)])
    cfg = small_cfg(root_type=root_type, anchor=anchor, gather=gather)
    t = spr.encode(kps, boxes_of(kps), SK, cfg, (128, 128))
    poses, scores, num = decode_np(t, cfg)
    assert num[0] == 3 and np.all(scores[0, :3] == 1.0) and np.all(scores[0, 3:] == 0)
    np.testing.assert_allclose(match(poses[0, :3], kps), kps[..., :2], atol=2e-3)
    assert not poses[0, 3:].any()


def test_decoder_returns_the_root_cells():
    """Decoded roots are the centres of the people's root cells, in network-input pixels."""
    cfg = small_cfg(root_type="bbox_center")
    kps = np.stack([person({NECK: (21.0, 17.0), HEAD: (23.0, 9.0)}),
                    person({NECK: (45.0, 41.0), HEAD: (41.0, 33.0)})])
    boxes = np.array([[10.0, 6.0, 30.0, 30.0], [36.0, 30.0, 57.0, 51.0]])
    t = spr.encode(kps, boxes, SK, cfg, (64, 64))
    out = spr.decode(tf.constant(t["root"][None]), tf.constant(t["disp"][None]), SK, cfg)
    assert int(out.num_people[0]) == 2
    # box centres (20, 18) and (46.5, 40.5) -> output cells (5, 4) and (11, 10) -> centres * 4
    got = sorted(map(tuple, out.roots.numpy()[0, :2].tolist()))
    assert got == [(22.0, 18.0), (46.0, 42.0)]
    assert np.all(out.roots.numpy()[0, 2:] == 0)


def test_people_at_image_borders():
    cfg = small_cfg()
    # A: centroid left of the image, some labelled joints outside (x < 0), one inside.
    a = person({R_SHOULDER: (-10.3, 20.2), R_ELBOW: (-18.6, 30.1), R_WRIST: (-4.4, 36.9),
                L_SHOULDER: (3.3, 21.7), NECK: (-2.1, 14.8)})
    # B: every labelled joint right of the image: not encoded at all.
    b = person({NECK: (70.2, 30.5), HEAD: (75.0, 20.0)})
    # C: near the bottom-right corner, inside.
    c = person({NECK: (61.2, 60.7), HEAD: (62.9, 55.1), R_SHOULDER: (58.3, 63.9)})
    kps = np.stack([a, b, c])
    t = spr.encode(kps, boxes_of(kps), SK, cfg, (64, 64))
    # A's centroid x = (-10.3 - 18.6 - 4.4 + 3.3 - 2.1) / 5 < 0 -> clamped to column 0;
    #   y = (20.2 + 30.1 + 36.9 + 21.7 + 14.8) / 5 = 24.74 -> map 6.185 -> row 6.
    # C's centroid (60.8, 59.9) -> map (15.2, 14.975) -> column 15, row 14.
    peaks = set(zip(*np.nonzero(t["root"][..., 0] == 1.0)))
    assert peaks == {(6, 0), (14, 15)}
    assert np.sum(spr.find_root_peaks(tf.constant(t["root"][None]), cfg)[1].numpy() > 0) == 2
    for gather in ("bilinear", "nearest"):
        poses, _, num = decode_np(t, dataclasses.replace(cfg, gather=gather))
        assert num[0] == 2
        got = match(poses[0, :2], kps[[0, 2]])
        for kp, pose in zip(kps[[0, 2]], got):     # joints outside the image come back too
            lab = kp[:, 2] > 0
            np.testing.assert_allclose(pose[lab], kp[lab, :2], atol=2e-3)


@pytest.mark.parametrize("anchor", ["parent", "root"])
def test_overlapping_people_nearest_anchor_wins(anchor):
    cfg = small_cfg(anchor=anchor)
    # Two people whose root discs (tau = 3) overlap: roots at cells (6, 8) and (10, 8).
    a = person({NECK: (26.0, 30.0), R_SHOULDER: (20.0, 36.0), L_SHOULDER: (32.0, 36.0)})   # (26, 34)
    b = person({NECK: (42.0, 30.0), R_SHOULDER: (36.0, 36.0), L_SHOULDER: (48.0, 36.0)})   # (42, 34)
    kps = np.stack([a, b])
    t = spr.encode(kps, boxes_of(kps), SK, cfg, (64, 64))
    z = math.sqrt(512)
    # cell (x=9, y=8), centre (9.5, 8.5): 3 from A's root centre (6.5, 8.5), 1 from B's (10.5, 8.5)
    # -> B's neck, map (10.5, 7.5): ((10.5 - 9.5) / z, (7.5 - 8.5) / z), not an average with A's.
    np.testing.assert_allclose(t["disp"][8, 9, 2 * NECK:2 * NECK + 2], [1 / z, -1 / z], rtol=1e-6)
    # cell (x=7, y=8) is nearer A: A's neck (6.5, 7.5) -> (-1 / z, -1 / z)
    np.testing.assert_allclose(t["disp"][8, 7, 2 * NECK:2 * NECK + 2], [-1 / z, -1 / z], rtol=1e-6)
    poses, _, num = decode_np(t, cfg)
    assert num[0] == 2
    got = match(poses[0, :2], kps)
    lab = kps[0, :, 2] > 0
    np.testing.assert_allclose(got[:, lab], kps[:, lab, :2], atol=2e-3)


def test_reading_support_is_claimed_before_a_nearer_anchor():
    """A cell of A's bilinear support that is nearer B's anchor (but not in B's support) stays A's."""
    cfg = small_cfg(tau=4.0)
    # head channel anchors (the necks) at map (5.4, 8.4) for A and (4.5, 6.45) for B: cell (4, 7),
    # centre (4.5, 7.5), is 1.27 from A and 1.05 from B, but |dy| = 1.05 >= 1 from B.
    a = person({NECK: (21.6, 33.6), HEAD: (30.0, 20.0), L_SHOULDER: (50.0, 50.0)})
    b = person({NECK: (18.0, 25.8), HEAD: (8.0, 40.0), R_SHOULDER: (4.0, 6.0)})
    kps = np.stack([a, b])
    t = spr.encode(kps, boxes_of(kps), SK, cfg, (64, 64))
    z = math.sqrt(512)
    np.testing.assert_allclose(t["disp"][7, 4, 2 * HEAD:2 * HEAD + 2],
                               [(7.5 - 4.5) / z, (5.0 - 7.5) / z], rtol=1e-5)   # A's head (7.5, 5)
    poses, _, num = decode_np(t, cfg)
    assert num[0] == 2
    np.testing.assert_allclose(match(poses[0, :2], kps)[:, HEAD], kps[:, HEAD, :2], atol=2e-3)


@pytest.mark.parametrize("gather", ["bilinear", "nearest"])
def test_unlabelled_joints_and_parents(gather):
    cfg = small_cfg(gather=gather)
    # right shoulder unlabelled but its elbow and wrist are; left elbow unlabelled but its wrist
    # is; head unlabelled with no labelled descendant.
    p = person({NECK: (60.3, 40.2), L_SHOULDER: (70.6, 50.1), R_ELBOW: (44.2, 66.8),
                R_WRIST: (40.7, 83.1), L_WRIST: (76.9, 80.4)})
    t = spr.encode(p[None], boxes_of(p[None]), SK, cfg, (128, 128))
    w = t["disp_weight"]
    # unlabelled joints never carry weight; a parent of labelled joints is still written
    assert not w[..., 2 * R_SHOULDER].any() and t["disp"][..., 2 * R_SHOULDER].any()
    assert not w[..., 2 * L_ELBOW].any() and t["disp"][..., 2 * L_ELBOW].any()
    assert not w[..., 2 * HEAD].any() and not t["disp"][..., 2 * HEAD].any()
    # the elbow hangs from the virtual shoulder (the root cell centre): a full disc of 29 cells;
    # the wrist from the elbow at map (11.05, 16.7): count the cell centres within tau by brute force
    assert w[..., 2 * R_ELBOW].sum() == 29
    near = sum((x + 0.5 - 11.05) ** 2 + (y + 0.5 - 16.7) ** 2 <= 9 for x in range(32) for y in range(32))
    assert w[..., 2 * R_WRIST].sum() == near
    poses, _, num = decode_np(t, cfg)
    assert num[0] == 1
    lab = p[:, 2] > 0
    np.testing.assert_allclose(poses[0, 0, lab], p[lab, :2], atol=2e-3)
    # centroid (58.54, 64.12) -> map (14.635, 16.03) -> root cell (14, 16), centre (14.5, 16.5)
    # = input (58, 66): the virtual right shoulder sits there, the virtual left elbow on the
    # left shoulder.
    np.testing.assert_allclose(poses[0, 0, R_SHOULDER], [58.0, 66.0], atol=2e-3)
    np.testing.assert_allclose(poses[0, 0, L_ELBOW], p[L_SHOULDER, :2], atol=2e-3)


def test_image_with_nobody():
    cfg = small_cfg()
    kps, boxes = np.zeros((0, J, 3)), np.zeros((0, 4))
    t = spr.encode(kps, boxes, SK, cfg, (64, 64))
    assert {k: v.shape for k, v in t.items()} == {"root": (16, 16, 1), "root_weight": (16, 16, 1),
                                                   "disp": (16, 16, 2 * J), "disp_weight": (16, 16, 2 * J)}
    assert all(v.dtype == np.float32 for v in t.values())
    assert not t["root"].any() and not t["disp"].any() and not t["disp_weight"].any()
    poses, scores, num = decode_np(t, cfg)
    assert num.tolist() == [0] and not scores.any() and not poses.any()
    assert poses.shape == (1, cfg.max_people, J, 2)


def test_decoder_on_noisy_maps_finds_only_real_peaks():
    cfg = small_cfg(sigma=3.0, nms_window=5)
    rng = np.random.default_rng(3)
    kps = random_people(rng, [(30, 30), (95, 40), (60, 100)], spread=10)
    t = spr.encode(kps, boxes_of(kps), SK, cfg, (128, 128))
    true_cells = {tuple(c) for c in zip(*np.nonzero(t["root"][..., 0] == 1.0))}
    root = t["root"][..., 0] + rng.uniform(0.0, 0.1, size=(32, 32))
    yy, xx = np.mgrid[0:32, 0:32]
    for cx, cy in [(5, 28), (28, 5), (16, 16), (30, 30)]:   # spurious blobs below the threshold
        root = np.maximum(root, 0.25 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 4.0))
    disp = t["disp"] + rng.normal(0.0, 1e-3, size=t["disp"].shape)
    poses, scores, num = decode_np({"root": root[..., None].astype(np.float32),
                                    "disp": disp.astype(np.float32)}, cfg)
    assert num[0] == 3
    # every found peak is a true root cell: its pose is within noise of a true person
    # (noise 1e-3 * Z * stride ~ 0.18 px per reading step, three steps at most)
    got = match(poses[0, :3], kps)
    np.testing.assert_allclose(got, kps[..., :2], atol=1.5)
    cells, _, _ = spr.find_root_peaks(tf.constant(root[None, ..., None].astype(np.float32)), cfg)
    assert {(int(y), int(x)) for x, y in cells.numpy()[0, :3]} == true_cells


# ----------------------------------------------------------------------------- flip

def flip_people(kps: np.ndarray, boxes: np.ndarray, width: float):
    """Mirror people about the image's vertical centre line: x -> width - x, left <-> right."""
    out = kps[:, list(SK.flip_index)].copy()
    out[..., 0] = width - out[..., 0]
    fb = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
    return out, fb


@pytest.mark.parametrize("anchor", ["parent", "root"])
def test_flipped_people_give_flipped_targets(anchor):
    cfg = small_cfg(anchor=anchor)
    rng = np.random.default_rng(11)
    kps = random_people(rng, [(30, 40), (90, 80)], spread=14, unlabelled_prob=0.2)
    boxes = boxes_of(kps)
    t = spr.encode(kps, boxes, SK, cfg, (128, 128))
    f = spr.encode(*flip_people(kps, boxes, 128.0), SK, cfg, (128, 128))
    root, disp = spr.flip_maps(t["root"], t["disp"], SK)
    np.testing.assert_allclose(f["root"], root, atol=1e-6)
    np.testing.assert_allclose(f["disp"], disp, atol=1e-6)
    _, weight = spr.flip_maps(t["root"], t["disp_weight"], SK)
    np.testing.assert_array_equal(f["disp_weight"], np.abs(weight))
    # the TensorFlow path of flip_maps agrees, on a batch
    root_tf, disp_tf = spr.flip_maps(tf.constant(t["root"][None]), tf.constant(t["disp"][None]), SK)
    np.testing.assert_allclose(disp_tf.numpy()[0], disp, atol=1e-7)
    np.testing.assert_array_equal(root_tf.numpy()[0], root)
    # decoding flipped maps gives the mirrored people
    poses, _, num, _ = spr.decode(root_tf, disp_tf, SK, cfg)
    assert int(num[0]) == 2
    fk, _ = flip_people(kps, boxes, 128.0)
    got = match(poses.numpy()[0, :2], fk)
    for kp, pose in zip(fk, got):
        lab = kp[:, 2] > 0
        np.testing.assert_allclose(pose[lab], kp[lab, :2], atol=2e-3)


# ----------------------------------------------------------------------------- errors and records

def test_bad_input_is_refused():
    cfg = small_cfg()
    with pytest.raises(ValueError, match="expects \\[N, 14, 3\\]"):
        spr.encode(np.zeros((1, 17, 3)), np.zeros((1, 4)), SK, cfg, (64, 64))
    with pytest.raises(ValueError, match="boxes"):
        spr.encode(np.zeros((2, J, 3)), np.zeros((1, 4)), SK, cfg, (64, 64))
    with pytest.raises(ValueError, match="multiple of the output stride"):
        spr.encode(np.zeros((0, J, 3)), np.zeros((0, 4)), SK, cfg, (62, 64))
    with pytest.raises(ValueError, match="sqrt\\(2\\)"):
        spr.encode(np.zeros((0, J, 3)), np.zeros((0, 4)), SK, small_cfg(tau=1.0), (64, 64))
    with pytest.raises(ValueError, match="28"):
        spr.decode(tf.zeros([1, 16, 16, 1]), tf.zeros([1, 16, 16, 10]), SK, cfg)


# ----------------------------------------------------------------------------- real annotations

def test_round_trip_on_real_ai_challenger_people():
    """Default SprConfig at 512x512 on the 1000 real images: nearly every person comes back exactly."""
    from dataset.ai_challenger import read_ai_challenger
    from dataset.convert import estimate_image_sizes
    from dataset.letterbox import letterbox_params, to_network

    cfg = SprConfig()
    records, _ = read_ai_challenger(AIC_ANNOTATIONS)
    sizes = estimate_image_sizes(records)
    decode = spr.make_decoder(SK, cfg, (128, 128))
    exact = total = 0
    for start in range(0, len(records), 50):
        batch, people = [], []
        for rec, (width, height) in zip(records[start:start + 50], sizes[start:start + 50]):
            lb = letterbox_params(height, width, 512, 512)
            kps = rec.keypoints.astype(np.float64).copy()
            kps[..., :2] = to_network(kps[..., :2], lb)
            boxes = to_network(rec.boxes.reshape(-1, 2, 2), lb).reshape(-1, 4)
            batch.append(spr.encode(kps, boxes, SK, cfg, (512, 512)))
            people.append(kps)
        poses, _, num, _ = decode(np.stack([t["root"] for t in batch]), np.stack([t["disp"] for t in batch]))
        poses, num = poses.numpy(), num.numpy()
        for b, kps in enumerate(people):
            for kp in kps:
                lab = kp[:, 2] > 0
                err = np.abs(poses[b, :num[b]][:, lab] - kp[None, lab, :2]).max(axis=(1, 2))
                exact += int(num[b] > 0 and err.min() < 0.01)
                total += 1
    assert total > 2700
    assert exact / total >= 0.99, f"{total - exact} of {total} people not recovered exactly"
