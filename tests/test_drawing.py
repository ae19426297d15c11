"""Drawing helpers (utils/drawing.py): cheap pixel checks that would catch a wrong colour,
a wrong coordinate convention or a heat overlay that tints the whole image."""

import os

import cv2
import numpy as np

from config import get_skeleton
from utils import drawing

SK = get_skeleton("ai_challenger")
NECK, HEAD = SK.index("neck"), SK.index("head_top")


def test_limb_is_drawn_between_its_joints_in_the_child_colour():
    image = np.zeros((60, 80, 3), np.uint8)
    pose = np.full((SK.num_joints, 2), np.nan)
    pose[NECK] = (10.0, 30.0)
    pose[HEAD] = (70.0, 30.0)
    drawing.draw_pose(image, pose, SK, thickness=3, radius=2)
    colour = SK.joint_colors[HEAD]                         # a limb takes its child joint's colour
    # row 30 (continuous y = 30 lies on the border of pixel rows 29 and 30) between the joints
    np.testing.assert_array_equal(image[29:31, 25:55].max(axis=0), np.tile(colour, (30, 1)))
    assert not image[:20].any() and not image[41:].any()   # nothing far above or below the limb
    assert not image[:, 75:].any()                          # nothing beyond the head joint
    # unlabelled (NaN) joints draw nothing: every drawn pixel is near the neck-head segment
    ys, xs = np.nonzero(image.any(axis=2))
    assert ys.min() >= 25 and ys.max() <= 34 and xs.min() >= 6 and xs.max() <= 74


def test_a_wild_joint_far_outside_is_drawn_toward_not_crashed_on():
    """An untrained model can regress a joint 1e30 pixels away; drawing the prediction pictures
    must not stop the run (it did: OpenCV's points are 32-bit ints)."""
    image = np.zeros((60, 80, 3), np.uint8)
    pose = np.full((SK.num_joints, 2), np.nan)
    pose[NECK] = (10.0, 30.0)
    pose[HEAD] = (1e30, 30.0)
    drawing.draw_pose(image, pose, SK, thickness=3, radius=2)
    assert image[29:31, 20:80].any(axis=2).any(axis=0).all()   # the limb runs to the right border


def test_visible_mask_hides_joints_and_their_limbs():
    image = np.zeros((60, 80, 3), np.uint8)
    pose = np.zeros((SK.num_joints, 2)) + 5.0
    pose[NECK], pose[HEAD] = (10.0, 30.0), (70.0, 30.0)
    visible = np.zeros(SK.num_joints, bool)
    visible[NECK] = True
    drawing.draw_pose(image, pose, SK, visible=visible, radius=2)
    assert not image[:, 20:].any() and image[28:32, 8:12].any()


def test_heat_overlay_only_tints_where_there_is_heat():
    image = np.full((40, 40, 3), 100, np.uint8)
    heat = np.zeros((10, 10))
    heat[2, 7] = 1.0                                        # cell -> pixels rows 8..11, cols 28..31
    out = drawing.heat_overlay(image, heat, alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    mask = np.zeros((40, 40), bool)
    mask[8:12, 28:32] = True
    np.testing.assert_array_equal(out[~mask], image[~mask])
    # JET at 1.0 is dark red: half of it over grey 100 -> red up, blue down
    assert (out[mask][:, 0] > 100).all() and (out[mask][:, 2] < 100).all()


def test_arrows_and_chains_follow_the_anchors():
    image = np.zeros((50, 50, 3), np.uint8)
    pose = np.full((SK.num_joints, 2), 40.0)
    pose[NECK], pose[HEAD] = (25.0, 30.0), (25.0, 10.0)
    labelled = np.zeros(SK.num_joints, bool)
    labelled[[NECK, HEAD]] = True
    parents = SK.parents                                    # head hangs from the neck
    drawing.draw_displacement_chains(image, (25.0, 45.0), pose, parents, labelled, color=(0, 255, 0))
    column = image[:, 24:26, 1].max(axis=1)
    assert (column[12:44] > 0).all()                        # root (y 45) -> neck (30) -> head (10)
    assert not image[:, :20].any() and not image[:, 31:].any()


def test_draw_root_and_save(tmp_path):
    image = np.zeros((40, 40, 3), np.uint8)
    drawing.draw_root(image, (20.0, 20.0), score=0.87)
    assert image[19:21, 14:26].any() and not image[35:, :10].any()
    path = drawing.save_rgb(os.path.join(tmp_path, "x.png"), image)
    back = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, image)
