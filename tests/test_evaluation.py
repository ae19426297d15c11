"""Result records of predictions (utils/evaluation.py)."""

import numpy as np

from config import get_skeleton
from utils.evaluation import aic_prediction, coco_results

J = get_skeleton("ai_challenger").num_joints


def test_prediction_records():
    poses = np.arange(2 * J * 2, dtype=np.float64).reshape(2, J, 2) + 0.25
    rec = aic_prediction("abc", poses)
    assert rec["image_id"] == "abc" and list(rec["keypoint_annotations"]) == ["human1", "human2"]
    assert rec["keypoint_annotations"]["human2"][:6] == [28.25, 29.25, 1.0, 30.25, 31.25, 1.0]
    res = coco_results(7, poses[:1], np.array([0.5]))
    assert res[0]["image_id"] == 7 and res[0]["category_id"] == 1 and res[0]["score"] == 0.5
    assert len(res[0]["keypoints"]) == 3 * J and res[0]["keypoints"][3:6] == [2.25, 3.25, 1.0]
