"""The synthetic data set: determinism, true visibility flags and boxes, the on-disk cache."""

import json
import os

import numpy as np
import pytest

from config import get_preset, get_skeleton
from dataset import synthetic
from dataset.ai_challenger import read_ai_challenger
from config.skeletons import VIS_OCCLUDED, VIS_UNLABELLED, VIS_VISIBLE

SKELETON = get_skeleton("ai_challenger")


def test_render_is_a_function_of_seed_split_and_index():
    a, img_a = synthetic.render_record(3, "train", 5, None)
    b, img_b = synthetic.render_record(3, "train", 5, None)
    assert np.array_equal(img_a, img_b)
    assert np.array_equal(a.keypoints, b.keypoints) and np.array_equal(a.boxes, b.boxes)
    for other in (synthetic.render_record(4, "train", 5, None), synthetic.render_record(3, "val", 5, None),
                  synthetic.render_record(3, "train", 6, None)):
        assert other[1].shape != img_a.shape or not np.array_equal(other[1], img_a)


def test_generated_files_identical_for_a_seed_and_different_for_another(tmp_path):
    dirs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        synthetic.generate_synthetic_dataset(str(tmp_path / name), 4, 2, seed=seed, workers=1)
        dirs[name] = tmp_path / name

    def contents(root):
        return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
                for d, _, files in os.walk(root) for f in files}

    a, b, c = (contents(dirs[k]) for k in "abc")
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)
    assert a["train.json"] != c["train.json"]
    assert a["train/train_000000.jpg"] != c["train/train_000000.jpg"]
    # the written annotation reads back through the AI Challenger reader with every person kept
    records, stats = read_ai_challenger(str(dirs["a"] / "train.json"), str(dirs["a"] / "train"))
    assert len(records) == 4 and not stats.dropped_people
    assert all(os.path.exists(r.image_path) for r in records)
    coco = json.load(open(dirs["a"] / "train_coco.json"))
    assert len(coco["annotations"]) == sum(r.num_people for r in records)


def _solid_figure(height, center, colour):
    """A figure of a fixed pose drawn in one flat colour (no texture)."""
    fig = synthetic.make_figure(np.random.default_rng(0), SKELETON, height, center)
    fig.colors = {k: np.float32(colour) for k in ("shirt", "trousers", "skin", "hair", "shoes")}
    fig.colors["sleeves"] = np.float32(1)
    fig.pattern = 0
    return fig


def test_visibility_flags_and_boxes_are_true():
    """Back figure green, front figure red, a third cut by the left border; black background.

    Checked from the pixels, not from the generator's bookkeeping: an occluded joint sits on a
    red pixel, a visible joint of the green figure does not; joints outside the image are
    unlabelled at (0, 0); the front figure's box is exactly the box of the red pixels.
    """
    H, W = 240, 320
    back = _solid_figure(150, (150, 125), (0, 200, 0))
    front = _solid_figure(200, (170, 140), (200, 0, 0))
    cut = _solid_figure(120, (5, 150), (0, 0, 200))
    scene = synthetic.paint_scene(np.zeros((H, W, 3), np.uint8), [back, cut, front], SKELETON)
    kps, img = scene.keypoints, scene.image
    assert kps.shape == (3, SKELETON.num_joints, 3)

    def pixel(xy):
        return img[int(np.floor(xy[1])), int(np.floor(xy[0]))]

    vis = kps[0, :, 2]
    assert (vis == VIS_OCCLUDED).sum() >= 3 and (vis == VIS_VISIBLE).sum() >= 1
    for j in range(SKELETON.num_joints):
        red = pixel(kps[0, j, :2])[0] > 0
        assert red == (vis[j] == VIS_OCCLUDED), SKELETON.joint_names[j]
    # the partial figure: joints left of x = 0 are unlabelled at (0, 0), the others labelled
    outside = cut.joints[:, 0] < 0
    assert outside.any() and (~outside).any()
    assert np.all(kps[1, outside] == 0)
    assert np.all(kps[1, ~outside, 2] > VIS_UNLABELLED)
    assert np.allclose(kps[1, ~outside, :2], cut.joints[~outside], atol=1e-4)
    # the front figure: all visible, box = tight box of its (red) pixels
    assert np.all(kps[2, :, 2] == VIS_VISIBLE)
    ys, xs = np.nonzero(img[..., 0] > 0)
    np.testing.assert_array_equal(scene.boxes[2], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    # the cut figure's box starts at the border; the back figure's box holds its visible pixels
    assert scene.boxes[1][0] == 0
    ys, xs = np.nonzero(img[..., 1] > 0)
    b = scene.boxes[0]
    assert b[0] <= xs.min() and b[1] <= ys.min() and b[2] >= xs.max() + 1 and b[3] >= ys.max() + 1


def test_random_scenes_are_varied_and_consistent():
    sizes, people, flags = set(), [], np.zeros(3, int)
    for i in range(12):
        s = synthetic.render_image(synthetic.image_rng(0, "train", i))
        H, W = s.image.shape[:2]
        assert 320 <= H <= 640 and 320 <= W <= 640
        sizes.add((H, W))
        people.append(len(s.boxes))
        assert 1 <= len(s.boxes) <= 6
        vis = s.keypoints[..., 2].astype(int)
        flags += np.bincount(vis.ravel(), minlength=3)
        lab = vis > 0
        xy = s.keypoints[..., :2]
        assert np.all((xy[lab] >= 0) & (xy[lab] < [W, H]))
        # every labelled joint lies in its person's box (the joints are drawn pixels)
        for n in range(len(s.boxes)):
            p = xy[n][lab[n]]
            assert np.all(p >= s.boxes[n, :2] - 1) and np.all(p <= s.boxes[n, 2:] + 1)
    assert len(sizes) == 12 and len(set(people)) >= 3
    assert flags.min() > 0          # unlabelled, occluded and visible joints all occur


def test_ensure_generates_once_and_redoes_an_interrupted_run(tmp_path, monkeypatch):
    cfg = get_preset("tiny_synthetic").replace(synthetic_dir=str(tmp_path), synthetic_train_images=3,
                                               synthetic_val_images=2, synthetic_seed=5)
    paths = synthetic.ensure_synthetic_dataset(cfg)
    assert os.path.basename(paths.root) == synthetic.synthetic_cache_key(5, 3, 2)
    assert os.path.exists(os.path.join(paths.root, synthetic.COMPLETE_MARKER))
    assert len(json.load(open(paths.val_json))) == 2

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete data set")

    monkeypatch.setattr(synthetic, "generate_synthetic_dataset", fail)
    assert synthetic.ensure_synthetic_dataset(cfg) == paths
    monkeypatch.undo()
    # an interrupted generation (no marker) is redone
    os.remove(os.path.join(paths.root, synthetic.COMPLETE_MARKER))
    os.remove(paths.train_json)
    paths2 = synthetic.ensure_synthetic_dataset(cfg)
    assert paths2 == paths and len(json.load(open(paths.train_json))) == 3
    assert [e for e in os.listdir(tmp_path) if ".partial-" in e] == []


def test_bad_counts_raise():
    with pytest.raises(ValueError, match="image counts"):
        synthetic.generate_synthetic_dataset("/nonexistent/never", -1, 2)
