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
    first, again = Evaluator(cfg), Evaluator(cfg)
    ids = [r.image_id for r in first.subset_records]
    all_ids = [r.image_id for r in first.records]
    assert len(all_ids) == 4 and ids == [r.image_id for r in again.subset_records]
    # seed 0 draws records 2 and 3 of the file, seed 3 records 0 and 2 (numpy's Generator
    # choice), each in file order
    assert ids == [all_ids[2], all_ids[3]]
    other = Evaluator(cfg.replace(seed=3))
    assert [r.image_id for r in other.subset_records] == [all_ids[0], all_ids[2]]
    assert [r.image_id for r in Evaluator(cfg.replace(max_val_images=4)).subset_records] == all_ids  # not larger
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


def _oracle_model(targets):
    """A "network" whose maps are the SPR targets of the picture it is shown: each test
    picture is one flat grey level, 8 x its index, which the centre pixel of the letterboxed
    input gives back."""
    import tensorflow as tf

    root = tf.constant(np.stack([t["root"] for t in targets]))
    disp = tf.constant(np.stack([t["disp"] for t in targets]))

    def model(images, training=False):
        h, w = images.shape[1] // 2, images.shape[2] // 2
        index = tf.cast(tf.round(images[:, h, w, 0] / 8.0), tf.int32)
        return {"root": tf.gather(root, index), "disp": tf.gather(disp, index)}
    return model


@pytest.mark.parametrize("fmt", ["ai_challenger", "coco", "crowdpose"])
def test_ground_truth_as_the_network_maps_scores_about_one_through_predict_records(tmp_path, fmt):
    """The real records' SPR targets fed as the network's maps through predict_records (the
    evaluation pipeline's letterbox, batching, unbatching, mapping back and result records) and
    scored with the data set's official metric: about 1.0 (the oracle round trip), for AI
    Challenger's example file (24 images: 0.9974 at 256x256, where two people's same joints
    share reading cells), the real COCO photographs (1.0) and CrowdPose's own file read with the
    skeleton its category names (--dataset coco without --skeleton: CrowdPose's joint order,
    tree and OKS sigmas in COCOeval)."""
    import cv2

    from config import get_preset
    from conftest import AIC_ANNOTATIONS, ROOT
    from dataset.ai_challenger import ai_challenger_records
    from dataset.coco import read_coco, resolve_skeleton
    from dataset.letterbox import letterbox_params, to_network
    from nets.spr import encode
    from utils.evaluation import score_predictions_for
    from utils.predict import Predictor, predict_records

    cfg = get_preset("tiny_synthetic").replace(score_threshold=0.5, max_people=20, joint_heatmaps=False)
    images = tmp_path / "images"
    images.mkdir()
    if fmt in ("coco", "crowdpose"):
        photos = os.path.join(ROOT, "tests", "data", "real_photos")
        ann = os.path.join(photos, f"{'coco_person' if fmt == 'coco' else 'crowdpose'}_keypoints.json")
        cfg = resolve_skeleton(cfg.replace(dataset="coco", skeleton="coco" if fmt == "coco" else "auto",
                                           train_json=ann, val_json=ann))
        assert cfg.skeleton.name == fmt and cfg.skeleton.num_joints == (17 if fmt == "coco" else 14)
        records, _ = read_coco(ann, str(images), skeleton=cfg.skeleton)
        sizes = [(r.height, r.width) for r in records]
    else:
        ann = str(tmp_path / "aic.json")
        data = json.load(open(AIC_ANNOTATIONS))[:24]
        json.dump(data, open(ann, "w"))
        records, _ = ai_challenger_records(data, ann, str(images))
        sizes = []
        for r in records:                    # the smallest picture holding every box and joint
            pts = np.concatenate([r.boxes.reshape(-1, 2), r.keypoints[..., :2].reshape(-1, 2)])
            sizes.append((int(pts[:, 1].max()) + 2, int(pts[:, 0].max()) + 2))
    H, W = cfg.data.input_height, cfg.data.input_width
    targets = []
    for i, (r, (h, w)) in enumerate(zip(records, sizes)):
        cv2.imwrite(r.image_path, np.full((h, w, 3), 8 * i, np.uint8))
        lb = letterbox_params(h, w, H, W)
        kps = r.keypoints.astype(np.float64)
        kps[..., :2] = to_network(kps[..., :2], lb)
        boxes = to_network(r.boxes.reshape(-1, 2, 2), lb).reshape(-1, 4)
        targets.append(encode(kps, boxes, cfg.skeleton, cfg.spr, (H, W)))
    predictions, pipeline = predict_records(Predictor(_oracle_model(targets), cfg), records, batch_size=5)
    assert pipeline.skipped.count == 0 and len(predictions) == len(records)
    assert [p.record.image_id for p in predictions] == [r.image_id for r in records]
    score = score_predictions_for(cfg, ann, predictions)["score"]
    assert score > 0.99, score
    if fmt == "crowdpose":
        # the skeleton's OKS sigmas reach COCOeval: poses 8 px off score as COCOeval scores them
        # with CrowdPose's sigmas, not as with COCO's first 14 (the face's small ones)
        import dataclasses

        from config.skeletons import COCO
        from utils.evaluation import score_coco

        shifted = [dataclasses.replace(p, poses=p.poses + 8.0) for p in predictions]
        got = score_predictions_for(cfg, ann, shifted)["AP"]
        assert got == pytest.approx(score_coco(ann, shifted, oks_sigmas=cfg.skeleton.oks_sigmas)["AP"], abs=1e-9)
        coco_sigmas = score_coco(ann, shifted, oks_sigmas=COCO.oks_sigmas[:14])["AP"]
        print(f"CrowdPose AP of poses 8 px off: {got:.4f} (with COCO's first 14 sigmas: {coco_sigmas:.4f})")
        assert 0.0 < got < 0.99 and abs(got - coco_sigmas) > 1e-3
