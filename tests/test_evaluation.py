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
