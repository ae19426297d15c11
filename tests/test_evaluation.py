"""Result records of predictions (utils/evaluation.py)."""

import json
import os

import numpy as np
import pytest

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


def test_per_epoch_evaluation_uses_a_fixed_seeded_subset(tmp_path):
    from config import get_preset
    from dataset.synthetic import ensure_synthetic_dataset
    from training_helpers import synthetic_config
    from utils.evaluation import Evaluator

    cfg = synthetic_config("", str(tmp_path), max_val_images=2)
    ensure_synthetic_dataset(cfg)
    first, again = Evaluator(cfg, subset=True), Evaluator(cfg, subset=True)
    everything = Evaluator(cfg)
    ids = [r.image_id for r in first.records]
    assert len(ids) == 2 and ids == [r.image_id for r in again.records]
    assert len(everything.records) == 4 and set(ids) < {r.image_id for r in everything.records}
    other = Evaluator(cfg.replace(seed=5), subset=True)
    assert len(other.records) == 2
    # the 512 presets evaluate a subset every 5 epochs; COCO keeps low-confidence people for AP
    aic, coco = get_preset("ai_challenger_w32_512"), get_preset("coco_w32_512")
    assert (aic.train.eval_every_epochs, aic.data.max_val_images) == (5, 3000)
    assert coco.spr.score_threshold < aic.spr.score_threshold


def test_the_training_loop_scores_with_flip_testing_when_configured(tmp_path):
    """--eval-flip: the loop's score is the flip-tested score of its model (the tiny preset's)."""
    from config import get_preset
    from dataset.synthetic import ensure_synthetic_dataset
    from training_helpers import randomise_output_kernels, synthetic_config
    from utils.evaluation import evaluate_model
    from utils.training import Trainer

    import keras

    assert get_preset("tiny_synthetic").train.eval_flip
    keras.utils.set_random_seed(0)            # the same random heads whatever ran before
    cfg = synthetic_config(str(tmp_path / "run"), str(tmp_path / "synth"), eval_flip=True, joint_heatmaps=True,
                           score_threshold=0.0, lr=0.0)
    ensure_synthetic_dataset(cfg)
    trainer = Trainer(cfg)
    randomise_output_kernels(trainer.model, std=0.3)
    got = trainer.evaluate(final=True)
    flipped, plain = evaluate_model(trainer.model, cfg, flip=True), evaluate_model(trainer.model, cfg)
    assert got["predicted_people"] == flipped["predicted_people"]
    assert got["score"] == flipped["score"]
    assert (plain["predicted_people"], plain["score"]) != (flipped["predicted_people"], flipped["score"])


def test_coco_metric_of_the_ground_truth_and_of_a_known_perturbation():
    """score_coco through the project's path (records -> Prediction -> coco_predictions ->
    COCOeval): the ground truth scores AP 1.0; the ground truth moved by (6, -4) px scores what
    pycocotools gives on results written by hand from the annotation file."""
    import io
    from contextlib import redirect_stdout

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from conftest import ROOT
    from dataset.coco import read_coco
    from utils.evaluation import score_coco
    from utils.predict import Prediction

    photos = os.path.join(ROOT, "tests", "data", "real_photos")
    ann = os.path.join(photos, "coco_person_keypoints.json")
    records, _ = read_coco(ann, photos)

    def predictions(shift):
        out = []
        for r in records:
            poses = r.keypoints[..., :2].astype(np.float64) + shift
            out.append(Prediction(r, poses, np.linspace(0.9, 0.5, len(poses)), poses[:, 0]))
        return out

    assert score_coco(ann, predictions(0.0))["AP"] == pytest.approx(1.0)
    got = score_coco(ann, predictions(np.array([6.0, -4.0])))
    data = json.load(open(ann))
    by_image = {}
    for a in data["annotations"]:
        if not a.get("iscrowd") and a.get("num_keypoints", 0) > 0:
            by_image.setdefault(a["image_id"], []).append(a)
    results = []
    for image_id, anns in by_image.items():
        for k, a in enumerate(anns):
            kps = np.reshape(a["keypoints"], (-1, 3)).astype(float)
            kps[:, 0] += 6.0
            kps[:, 1] -= 4.0
            kps[:, 2] = 1.0
            results.append({"image_id": image_id, "category_id": 1, "keypoints": kps.reshape(-1).tolist(),
                            "score": float(np.linspace(0.9, 0.5, len(anns))[k])})
    with redirect_stdout(io.StringIO()):
        gt = COCO(ann)
        ev = COCOeval(gt, gt.loadRes(results), "keypoints")
        ev.params.imgIds = sorted(by_image)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert 0.0 < ev.stats[0] < 0.99
    assert got["AP"] == pytest.approx(ev.stats[0], abs=1e-6) and got["AP50"] == pytest.approx(ev.stats[1], abs=1e-6)
