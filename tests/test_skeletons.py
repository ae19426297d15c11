"""Skeletons of any COCO-format data set (config/skeletons.py, dataset.coco.resolve_skeleton):
named ones, ``--skeleton auto`` from the training file's category, the errors of bad ones, and
a made-up 5-joint skeleton through training, scoring and export from the run directory alone."""

import json
import logging
import os

import cv2
import numpy as np
import pytest

from conftest import ROOT
from training_helpers import run_tool

PHOTOS = os.path.join(ROOT, "tests", "data", "real_photos")
COCO_EDGES = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
              [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]
FIVE = ["neck", "left_shoulder", "right_shoulder", "left_hand", "right_hand"]
FIVE_EDGES = [[1, 2], [1, 3], [2, 4], [3, 5]]


@pytest.mark.parametrize("name", ["ai_challenger", "coco", "crowdpose", "ochuman"])
def test_every_left_joint_flips_to_its_right_joint_and_back(name):
    from config.skeletons import get_skeleton

    sk = get_skeleton(name)
    perm = sk.flip_index
    sides = 0
    for j, joint in enumerate(sk.joint_names):
        for mine, other in (("left_", "right_"), ("right_", "left_")):
            if joint.startswith(mine):
                assert sk.joint_names[perm[j]] == other + joint[len(mine):], (name, joint)
                sides += 1
        if not joint.startswith(("left_", "right_")):
            assert perm[j] == j
    assert sides == 2 * len(sk.flip_pairs) >= 12
    assert [perm[perm[j]] for j in range(sk.num_joints)] == list(range(sk.num_joints))


def test_crowdpose_and_ochuman_are_their_data_sets_skeletons():
    from config.skeletons import COCO, get_skeleton

    crowd = get_skeleton("crowdpose")
    cat = json.load(open(os.path.join(PHOTOS, "crowdpose_keypoints.json")))["categories"][0]
    assert list(crowd.joint_names) == cat["keypoints"] and crowd.num_joints == 14
    assert crowd.oks_sigmas[-2:] == (0.079, 0.079) and crowd.levels[crowd.index("head")] == 2
    assert get_skeleton("ochuman").joint_names == COCO.joint_names
    assert get_skeleton("ochuman").oks_sigmas == COCO.oks_sigmas


def test_auto_takes_a_named_skeleton_when_the_names_are_one(caplog):
    """COCO's names give the coco skeleton (its hand-written hierarchy); CrowdPose's file, whose
    edges are COCO's 17-joint ones (1-based, some naming joints 15 to 17, others joining wrong
    joints), gives the crowdpose skeleton, its edges not used and the bad ones named."""
    from config.skeletons import COCO, derive_skeleton, get_skeleton

    assert derive_skeleton(COCO.joint_names, COCO_EDGES, "coco.json") is COCO
    cat = json.load(open(os.path.join(PHOTOS, "crowdpose_keypoints.json")))["categories"][0]
    with caplog.at_level(logging.WARNING):
        got = derive_skeleton(cat["keypoints"], cat["skeleton"], "crowdpose_keypoints.json")
    assert got is get_skeleton("crowdpose")
    assert "crowdpose_keypoints.json" in caplog.text and "[16, 14]" in caplog.text and "not used" in caplog.text


def test_the_derived_hierarchy_hangs_the_torso_from_the_root_and_the_rest_along_the_edges():
    """COCO's joints derived from COCO's edges (named=False): shoulders and hips at depth 1,
    elbows and knees 2, wrists and ankles 3; the face through the ears (COCO's edges join ears
    to shoulders): ears 2, eyes 3, nose 4, where the hand-written tree has nose 1, eyes 2, ears
    3. Flip pairs, sigmas and sides as COCO's."""
    from config.skeletons import COCO, derive_skeleton

    sk = derive_skeleton(COCO.joint_names, COCO_EDGES, "coco.json", named=False)
    depth = dict(zip(sk.joint_names, sk.levels))
    assert [depth[n] for n in ("left_shoulder", "right_hip", "left_elbow", "right_knee", "left_wrist",
                               "right_ankle")] == [1, 1, 2, 2, 3, 3]
    assert [depth[n] for n in ("left_ear", "right_eye", "nose")] == [2, 3, 4]
    assert sk.joint_names[sk.parents[sk.index("left_wrist")]] == "left_elbow"
    assert sk.flip_pairs == COCO.flip_pairs and sk.oks_sigmas == COCO.oks_sigmas
    assert sk.joint_colors[sk.index("left_wrist")] != sk.joint_colors[sk.index("right_wrist")]


def test_a_joint_neither_coco_nor_a_named_set_knows_gets_the_default_sigma_or_the_files():
    from config.skeletons import DEFAULT_OKS_SIGMA, derive_skeleton

    sk = derive_skeleton(FIVE, FIVE_EDGES, "five.json")
    assert sk.parents == (-1, -1, -1, 1, 2) and sk.flip_pairs == ((1, 2), (3, 4))
    assert sk.oks_sigmas == (0.079, 0.079, 0.079, DEFAULT_OKS_SIGMA, DEFAULT_OKS_SIGMA)
    assert derive_skeleton(FIVE, FIVE_EDGES, "five.json", oks_sigmas=[0.1] * 5).oks_sigmas == (0.1,) * 5


@pytest.mark.parametrize("names, edges, message", [
    (["neck", "neck", "tail"], [[1, 3]], r"bad\.json: keypoint names appear twice: neck"),
    (["neck", "left_paw", "right_paw"], [[1, 2], [1, 4]], r"bad\.json: skeleton edges \[\[1, 4\]\] name joints "
                                                          r"that do not exist \(the category has 3 joints"),
    (["neck", "left_paw", "right_paw", "tail"], [[1, 2], [1, 3]], r"bad\.json: no skeleton edge reaches the joints tail"),
    (["neck", "left_paw", "paw"], [[1, 2], [1, 3]], r"bad\.json: .*'left_paw' has no 'right_paw'"),
    (["neck", "l_paw", "paw"], [[1, 2], [1, 3]], r"'l_paw' has no 'r_paw'"),
])
def test_bad_skeletons_are_refused_naming_the_file_and_the_joints(names, edges, message):
    from config.skeletons import derive_skeleton

    with pytest.raises(ValueError, match=message):
        derive_skeleton(names, edges, "bad.json")


def test_another_dataset_without_skeleton_takes_the_files_own(tmp_path):
    """``--dataset coco`` on the tiny preset (ai_challenger) without --skeleton: the file's
    skeleton (once an error); CrowdPose's file resolves to crowdpose, COCO's to coco, a JSON of
    one's own to its derived skeleton, which config.json keeps whole."""
    from config import Config, add_config_args, config_from_args, load_config
    from dataset.coco import resolve_skeleton
    import argparse

    def cfg_of(*argv):
        return config_from_args(add_config_args(argparse.ArgumentParser()).parse_args(list(argv)))

    crowd = cfg_of("--dataset", "coco", "--train-json", os.path.join(PHOTOS, "crowdpose_keypoints.json"))
    assert crowd.data.skeleton == "auto"
    with pytest.raises(ValueError, match="derived from the data when the run starts"):
        crowd.skeleton
    assert resolve_skeleton(crowd).skeleton.name == "crowdpose"
    coco = cfg_of("--dataset", "coco", "--train-json", os.path.join(PHOTOS, "coco_person_keypoints.json"))
    assert resolve_skeleton(coco).data.skeleton == "coco"
    own = tmp_path / "paws.json"
    own.write_text(json.dumps({"keypoints": FIVE, "skeleton": FIVE_EDGES, "oks_sigmas": [0.05] * 5}))
    mine = resolve_skeleton(cfg_of("--dataset", "coco", "--skeleton", str(own)))
    assert mine.skeleton.joint_names == tuple(FIVE) and mine.skeleton.oks_sigmas == (0.05,) * 5
    mine.save(str(tmp_path / "run"))
    assert load_config(str(tmp_path / "run")).skeleton == mine.skeleton
    with pytest.raises(ValueError, match="--dataset coco needs --train-json FILE --train-images DIR"):
        resolve_skeleton(cfg_of("--dataset", "coco"))
    assert isinstance(Config().data.skeleton_spec, dict)


def _five_joint_coco(aic_json, image_dir, out):
    """The synthetic AI Challenger annotations as a COCO file of a made-up 5-joint skeleton
    (neck, shoulders, and the wrists called hands)."""
    from config.skeletons import AI_CHALLENGER

    keep = [AI_CHALLENGER.index(n) for n in ("neck", "left_shoulder", "right_shoulder", "left_wrist", "right_wrist")]
    images, anns = [], []
    for i, entry in enumerate(json.load(open(aic_json)), start=1):
        h, w = cv2.imread(os.path.join(image_dir, entry["image_id"] + ".jpg")).shape[:2]
        images.append({"id": i, "file_name": entry["image_id"] + ".jpg", "width": w, "height": h})
        for person, kps in entry["keypoint_annotations"].items():
            k = np.reshape(kps, (-1, 3))[keep]
            vis = np.where(k[:, 2] == 1, 2, np.where(k[:, 2] == 2, 1, 0))       # AIC 1/2/3 -> COCO 2/1/0
            xyv = np.concatenate([k[:, :2] * (vis[:, None] > 0), vis[:, None]], axis=1)
            x1, y1, x2, y2 = entry["human_annotations"][person]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "iscrowd": 0, "area": (x2 - x1) * (y2 - y1),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "num_keypoints": int((vis > 0).sum()),
                         "keypoints": [float(v) for v in xyv.reshape(-1)]})
    json.dump({"images": images, "annotations": anns, "categories": [
        {"id": 1, "name": "person", "keypoints": FIVE, "skeleton": FIVE_EDGES}]}, open(out, "w"))


def test_a_made_up_five_joint_skeleton_trains_scores_and_exports_from_the_run_directory(tmp_path):
    """main.py --dataset coco on a 5-joint COCO file: the derived skeleton in config.json; the
    ground truth as predictions scores COCO AP 1.0 with its sigmas; model_val.py --format coco
    predicts 5 joints a person; the SavedModel and the TFLite file, rebuilt from the run
    directory alone, give the Python path's 5-joint poses."""
    import main
    import tensorflow as tf
    from dataset.synthetic import generate_synthetic_dataset
    from utils import evaluation, export, predict

    paths = generate_synthetic_dataset(str(tmp_path / "synth"), num_train=8, num_val=3, seed=2)
    train, val = tmp_path / "train5.json", tmp_path / "val5.json"
    _five_joint_coco(paths.train_json, paths.train_images, train)
    _five_joint_coco(paths.val_json, paths.val_images, val)
    run = tmp_path / "run"
    args = main.build_parser("test").parse_args(
        ["--run-dir", str(run), "--dataset", "coco", "--train-json", str(train), "--train-images", paths.train_images,
         "--val-json", str(val), "--val-images", paths.val_images, "--input-height", "64", "--input-width", "64",
         "--batch-size", "2", "--epochs", "1", "--steps-per-epoch", "4", "--backbone", "hrnet_tiny",
         "--tiny-width", "8", "--tiny-modules", "1,1,1", "--head-channels", "16", "--score-threshold", "0",
         "--no-eval-flip"])
    assert main.run_cli(args) == 0
    saved = json.load(open(run / "config.json"))["data"]
    assert saved["skeleton"] == "auto" and saved["skeleton_spec"]["joint_names"] == FIVE
    model, cfg = predict.load_trained_model(str(run))
    assert cfg.skeleton.num_joints == 5 and model(np.zeros((1, 64, 64, 3), np.float32))["disp"].shape[-1] == 10
    # ground truth as predictions, through the project's COCO scoring path with the skeleton's sigmas
    from dataset.pipeline import load_records

    records, _ = load_records(cfg, "val")
    truth = [predict.Prediction(r, r.keypoints[..., :2].astype(np.float64), np.ones(len(r.keypoints)),
                                r.keypoints[:, 0, :2].astype(np.float64)) for r in records]
    assert evaluation.score_predictions_for(cfg, str(val), truth)["AP"] == pytest.approx(1.0)
    out = tmp_path / "pred.json"
    r = run_tool("model_val", "--ckpt", run, "--json", val, "--images", paths.val_images, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.load(open(out))
    assert results and all(len(p["keypoints"]) == 15 for p in results)
    image = cv2.cvtColor(cv2.imread(records[0].image_path), cv2.COLOR_BGR2RGB)
    want, = predict.predict_images(predict.Predictor(model, cfg), [image])
    sm = tf.saved_model.load(export.export_saved_model(model, cfg, str(tmp_path / "sm")))
    got = sm.signatures[export.IMAGES_SIGNATURE](images=tf.constant(image[None]))
    n = int(got["num_people"][0])
    assert n == len(want.poses) > 0 and got["poses"].shape[2] == 5
    np.testing.assert_allclose(np.sort(got["poses"][0, :n].numpy().reshape(-1)), np.sort(want.poses.reshape(-1)),
                               atol=0.05)
    meta = export.export_tflite(model, cfg, str(tmp_path / "spm.tflite"))
    assert meta["decoder_inside"] and meta["skeleton"] == "auto"
