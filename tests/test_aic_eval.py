"""The official AI Challenger keypoint score (utils/aic_eval.py).

Expected scores are worked out by hand in the comments; a loop-by-loop port of the official
script (Python 3, below) checks the vectorised scorer on perturbed real predictions.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import AIC_ANNOTATIONS, AIC_PREDICTIONS, ROOT
from dataset.errors import AnnotationError
from utils.aic_eval import evaluate_files, format_warnings, load_reference, score_predictions

# The official script's constants, copied here as an independent check of config/skeletons.py.
OFFICIAL_DELTA = 2 * np.array([0.01388152, 0.01515228, 0.01057665, 0.01417709, 0.01497891,
                               0.01402144, 0.03909642, 0.03686941, 0.01981803, 0.03843971,
                               0.03412318, 0.02415081, 0.01291456, 0.01236173])

# ------------------------------------------------------------------------------ hand-built cases


def person(offset=0.0, vis=1):
    """14 joints on a line, x = 10 + 5 j + offset, y = 50; all with visibility ``vis``."""
    values = []
    for j in range(14):
        values += [10 + 5 * j + offset, 50, vis]
    return values


BOX = [0, 0, 100, 100]   # area 10000: scale + 1 = 10001


def ref_image(image_id, people):
    """people: {name: keypoint list}; every person gets BOX."""
    return {"image_id": image_id, "human_annotations": {n: BOX for n in people},
            "keypoint_annotations": people}


def pred(image_id, people):
    return {"image_id": image_id, "keypoint_annotations": people}


FAR = 5000.0   # a prediction this far away has OKS exp(-huge) = 0


def test_perfect_match_scores_one():
    ref = [ref_image("a", {"human1": person(), "human2": person(30)}),
           ref_image("b", {"human1": person(7)})]
    sub = [pred("b", {"h": person(7)}), pred("a", {"x": person(30), "y": person()})]
    result = score_predictions(ref, sub)
    # every reference person finds an exact copy: OKS 1 > every threshold; 3 / max(G, P) sums 3
    assert result.score == 1.0
    assert result.denominator == 3
    assert result.warnings == []


def test_missing_image_counts_its_people_as_zeros():
    ref = [ref_image("a", {"human1": person(), "human2": person(30)}),
           ref_image("b", {"human1": person()})]
    result = score_predictions(ref, [pred("a", {"h1": person(), "h2": person(30)})])
    # oks_all = [1, 1, 0], denominator 2 + 1 = 3: every threshold gives 2 / 3
    assert result.score == pytest.approx(2 / 3, abs=1e-7)
    assert result.num_missing_images == 1
    assert result.warnings == ["b is not in the prediction JSON file."]


def test_extra_predictions_raise_the_denominator_to_max_g_p():
    ref = [ref_image("a", {"human1": person()})]
    sub = [pred("a", {"h1": person(FAR), "h2": person(), "h3": person(-FAR)})]
    # G = 1 person found exactly; P = 3: denominator max(1, 3) = 3 -> 1 / 3
    assert score_predictions(ref, sub).score == pytest.approx(1 / 3, abs=1e-7)


def test_person_without_visible_joint_has_oks_zero():
    # human1 is labelled but occluded everywhere (v = 2): no visible joint -> OKS 0 even though
    # the prediction is exact; human2 is found exactly: oks_all = [0, 1], denominator 2 -> 0.5
    ref = [ref_image("a", {"human1": person(vis=2), "human2": person(30)})]
    result = score_predictions(ref, [pred("a", {"p1": person(), "p2": person(30)})])
    assert result.oks.tolist() == [0.0, 1.0]
    assert result.score == pytest.approx(0.5, abs=1e-7)


def test_duplicate_prediction_ids_last_entry_wins():
    ref = [ref_image("a", {"human1": person()})]
    exact, far = pred("a", {"h": person()}), pred("a", {"h": person(FAR)})
    result = score_predictions(ref, [exact, far])
    assert result.score == 0.0                      # the far entry came last
    assert result.warnings == ["a is duplicated in prediction JSON file."]
    assert score_predictions(ref, [far, exact]).score == 1.0


def test_jpg_suffix_is_stripped_from_prediction_ids():
    # the official script crashes here; we match "a.jpg" to reference image "a"
    ref = [ref_image("a", {"human1": person()})]
    result = score_predictions(ref, [pred("a.jpg", {"h": person()})])
    assert result.score == 1.0 and result.warnings == []


def one_visible_joint_person(dx):
    """Only joint 0 (right shoulder) visible, moved by dx in the prediction; the rest occluded
    (v = 2, not counted by the official OKS) or unlabelled (v = 3)."""
    gt = person(vis=2)
    gt[2] = 1
    gt[-3:] = [0, 0, 3]
    guess = person(FAR)            # occluded joints may be anywhere: they do not count
    guess[0:3] = [gt[0] + dx, gt[1], 1]
    return gt, guess


@pytest.mark.parametrize("dx, expected_oks, expected_score", [
    # delta_0 = 2 * 0.01388152 = 0.02776304; 2 * delta_0^2 * (10000 + 1) = 15.4172694
    # dx = 2.10: 4.41 / 15.4172694 = 0.2860429, exp(-0.2860429) = 0.7512304 > 0.75
    #            -> thresholds 0.50 .. 0.75 pass: 6 of 10 -> 0.6
    (2.10, 0.7512304, 0.6),
    # dx = 2.11: 4.4521 / 15.4172694 = 0.2887736, exp(-0.2887736) = 0.7491818 < 0.75 -> 5 of 10
    (2.11, 0.7491818, 0.5),
])
def test_partial_oks_straddling_a_threshold(dx, expected_oks, expected_score):
    gt, guess = one_visible_joint_person(dx)
    result = score_predictions([ref_image("a", {"human1": gt})], [pred("a", {"h": guess})])
    assert result.oks[0] == pytest.approx(expected_oks, abs=1e-7)
    assert result.score == pytest.approx(expected_score, abs=1e-7)


def test_oks_is_the_mean_over_visible_joints():
    gt, guess = one_visible_joint_person(2.0)
    gt[9 + 2] = 1                  # left shoulder (joint 3) visible too, predicted exactly
    guess[9:12] = gt[9:12]
    # joint 0: 4 / 15.4172694 = 0.2594493, exp(-0.2594493) = 0.7714763; joint 3: exp(0) = 1
    # mean (0.7714763 + 1) / 2 = 0.8857382 -> thresholds 0.50 .. 0.85 pass: 8 of 10 -> 0.8
    result = score_predictions([ref_image("a", {"human1": gt})], [pred("a", {"h": guess})])
    assert result.oks[0] == pytest.approx(0.8857382, abs=1e-7)
    assert result.score == pytest.approx(0.8, abs=1e-7)


def test_scale_is_rounded_to_float32_as_the_official():
    # box area 16777217 = 2^24 + 1 is not a float32: float32 rounds it to 2^24 = 16777216,
    # so scale + 1 = 16777217 (not 16777218). One visible joint moved by 134 px.
    gt, guess = one_visible_joint_person(134.0)
    ref = [{"image_id": "a", "human_annotations": {"h": [0, 0, 16777217, 1]},
            "keypoint_annotations": {"h": gt}}]
    oks = score_predictions(ref, [pred("a", {"p": guess})]).oks[0]
    rounded = math.exp(-134.0 ** 2 / 2 / OFFICIAL_DELTA[0] ** 2 / 16777217.0)
    exact = math.exp(-134.0 ** 2 / 2 / OFFICIAL_DELTA[0] ** 2 / 16777218.0)
    assert abs(rounded - exact) > 1e-8           # the test can tell them apart
    assert oks == pytest.approx(rounded, abs=1e-14)


def test_empty_predictions_and_empty_images():
    ref = [ref_image("a", {"human1": person()}), ref_image("b", {"human1": person(), "human2": person()}),
           ref_image("c", {}), ref_image("d", {})]
    sub = [pred("a", {"h": person()}), pred("b", {}), pred("c", {}),
           pred("d", {"p1": person(), "p2": person()})]
    # a: OKS 1, +1; b: empty prediction dict adds G = 2 and no OKS; c: G = P = 0 adds nothing
    # (the official crashes); d: G = 0, P = 2 adds 2. oks_all = [1], denominator 5 -> 0.2
    result = score_predictions(ref, sub)
    assert result.denominator == 5
    assert result.oks.tolist() == [1.0]
    assert result.score == pytest.approx(0.2, abs=1e-7)


def test_entries_without_id_or_keypoints_are_skipped_with_warnings():
    ref = [ref_image("a", {"human1": person()})]
    sub = [{"keypoint_annotations": {}}, {"image_id": "a"}]
    result = score_predictions(ref, sub)
    assert result.warnings == ["There is an invalid annotation info, likely missing key 'image_id'.",
                               "a does not have key 'keypoint_annotations'.",
                               "a is not in the prediction JSON file."]
    assert result.score == 0.0


def test_prediction_visibility_is_ignored():
    ref = [ref_image("a", {"human1": person()})]
    assert score_predictions(ref, [pred("a", {"h": person(vis=3)})]).score == 1.0


def test_nothing_to_score_gives_zero_with_a_warning():
    result = score_predictions([ref_image("a", {})], [])
    assert result.score == 0.0 and "Nothing to score" in result.warnings[-1]


def test_format_warnings_caps_the_list():
    lines = format_warnings([f"w{i}" for i in range(25)], limit=20)
    assert lines[:20] == [f"w{i}" for i in range(20)] and lines[20] == "... and 5 more warnings"
    assert format_warnings(["a", "b"], limit=20) == ["a", "b"]

# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("entry, fragments", [
    (pred("img7.jpg", {"human2": person()[:-1]}), ["'img7.jpg'", "'human2'", "expected 42 numbers, got 41"]),
    (pred("img7", {"human2": person()[:-3] + [1, "x", 1]}), ["'img7'", "'human2'", "neck y", "not a number"]),
    (pred("img7", {"human2": person()[:-3] + [1, float("nan"), 1]}), ["'img7'", "neck y", "not a finite number"]),
    (pred("img7", [person()]), ["'img7'", "'keypoint_annotations' must be an object"]),
    (pred(7, {}), ["entry 0", "'image_id' must be a string"]),
    ("img7", ["entry 0", "expected an object"]),
])
def test_malformed_predictions_raise_naming_file_image_and_person(tmp_path, entry, fragments):
    path = tmp_path / "sub.json"
    path.write_text(json.dumps([entry]))
    with pytest.raises(AnnotationError) as e:
        evaluate_files(AIC_ANNOTATIONS, str(path))
    for fragment in [str(path)] + fragments:
        assert fragment in str(e.value)


def test_files_that_are_not_json_lists_raise(tmp_path):
    not_json = tmp_path / "broken.json"
    not_json.write_text('[{"image_id": "a",\n "keypoint_annotations": }]')   # the } is column 26
    with pytest.raises(AnnotationError, match=r"broken\.json: not valid JSON: .* line 2, column 26"):
        evaluate_files(AIC_ANNOTATIONS, str(not_json))
    a_dict = tmp_path / "dict.json"
    a_dict.write_text('{"image_id": "a"}')
    with pytest.raises(AnnotationError, match=r"dict\.json: a submission is a JSON list"):
        evaluate_files(AIC_ANNOTATIONS, str(a_dict))
    with pytest.raises(AnnotationError, match=r"missing\.json: no such file"):
        evaluate_files(str(tmp_path / "missing.json"), AIC_PREDICTIONS)


def test_malformed_reference_raises():
    ref = [{"image_id": "a", "human_annotations": {}, "keypoint_annotations": {"human1": person()}}]
    with pytest.raises(AnnotationError, match=r"gt\.json: image 'a', person 'human1': has keypoints but no box"):
        score_predictions(ref, [], ref_source="gt.json")

# ------------------------------------------------------------------------------ the example files


def test_example_files_score_the_published_value():
    result = evaluate_files(AIC_ANNOTATIONS, AIC_PREDICTIONS)
    assert "%.8f" % result.score == "0.99674031"       # the competition's published score
    assert result.num_images == 1000 and result.num_people == 2761


def test_command_line_prints_the_score_last_and_fails_cleanly(tmp_path):
    tool = os.path.join(ROOT, "tools", "ai_format_kps_eval.py")
    done = subprocess.run([sys.executable, tool, "--ref", AIC_ANNOTATIONS, "--submit", AIC_PREDICTIONS],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "Score: 0.99674031"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([pred("img9.jpg", {"human1": [1, 2, 3]})]))
    done = subprocess.run([sys.executable, tool, "--ref", AIC_ANNOTATIONS, "--submit", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 1
    assert str(bad) in done.stderr and "'img9.jpg'" in done.stderr and "Traceback" not in done.stderr

# ------------------------------------------------------------------------------ official loops


def official_score(ref, submit):
    """The official keypoint_eval.py, loop for loop, in Python 3 (dict keys in file order).

    Only change: predictions are stored under the stripped id (the official stores them under
    the raw id and then crashes looking them up by the stripped one).
    """
    annos = {a["image_id"]: a for a in ref}
    preds, pred_ids = {}, set()
    for p in submit:
        if "image_id" not in p or "keypoint_annotations" not in p:
            continue
        image_id = p["image_id"].split(".")[0]
        pred_ids.add(image_id)
        preds[image_id] = p["keypoint_annotations"]
    oks_all, oks_num = np.zeros(0), 0
    for image_id, anno in annos.items():
        if image_id in pred_ids:
            predict = preds[image_id]
            names = list(anno["keypoint_annotations"].keys())
            oks = np.zeros((len(names), len(predict)))
            if len(predict) == 0:
                oks = oks.T
            else:
                for i, name in enumerate(names):
                    gt = np.reshape(anno["keypoint_annotations"][name], (14, 3))
                    visible = gt[:, 2] == 1
                    box = anno["human_annotations"][name]
                    scale = np.float32((box[3] - box[1]) * (box[2] - box[0]))
                    if np.sum(visible) == 0:
                        continue
                    for j, key in enumerate(predict.keys()):
                        guess = np.reshape(predict[key], (14, 3))
                        dis = np.sum((gt[visible, :2] - guess[visible, :2]) ** 2, axis=1)
                        oks[i, j] = np.mean(np.exp(-dis / 2 / OFFICIAL_DELTA[visible] ** 2
                                                   / (np.float64(scale) + 1)))
            oks_all = np.concatenate((oks_all, np.max(oks, axis=1)), axis=0)
            oks_num += np.max(oks.shape)
        else:
            n = len(anno["human_annotations"].keys())
            oks_all = np.concatenate((oks_all, np.zeros(n)), axis=0)
            oks_num += n
    ap = [np.sum(oks_all > t) / np.float32(oks_num) for t in np.linspace(0.5, 0.95, 10)]
    return np.mean(ap), oks_all


def perturbed_predictions(ref, rng):
    """Reference people with noise of many sizes, some people and images dropped, extras added,
    some ids with a .jpg suffix and some images listed twice."""
    submit = []
    for anno in ref:
        if rng.random() < 0.05:
            continue
        people = {}
        for name, values in anno["keypoint_annotations"].items():
            if rng.random() < 0.15:
                continue
            xy = np.reshape(values, (14, 3))[:, :2].astype(float)
            xy += rng.normal(0, rng.choice([0.0, 2.0, 8.0, 20.0, 60.0]), xy.shape)
            people[name] = np.concatenate([xy, np.ones((14, 1))], 1).ravel().tolist()
        for k in range(rng.integers(0, 2)):
            people[f"extra{k}"] = rng.uniform(0, 800, 42).tolist()
        image_id = anno["image_id"] + (".jpg" if rng.random() < 0.2 else "")
        if rng.random() < 0.05:
            submit.append({"image_id": image_id, "keypoint_annotations": {}})
        submit.append({"image_id": image_id, "keypoint_annotations": people})
    return submit


@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_scorer_equals_official_loops(seed):
    with open(AIC_ANNOTATIONS) as f:
        ref = json.load(f)
    reference = load_reference(ref)
    submit = perturbed_predictions(ref, np.random.default_rng(seed))
    expected_score, expected_oks = official_score(ref, submit)
    result = score_predictions(reference, submit)
    assert 0.2 < expected_score < 0.9                 # the perturbation leaves a non-trivial score
    assert result.score == pytest.approx(expected_score, abs=1e-12)
    np.testing.assert_allclose(result.oks, expected_oks, rtol=0, atol=1e-12)


def test_official_loops_reproduce_the_published_example_score():
    with open(AIC_ANNOTATIONS) as f:
        ref = json.load(f)
    with open(AIC_PREDICTIONS) as f:
        submit = json.load(f)
    assert "%.8f" % official_score(ref, submit)[0] == "0.99674031"


def test_reference_with_odd_people_scores_as_the_official_script():
    """A reference the official script accepts (a negative coordinate on a labelled joint, a
    visibility outside 1-3, an inverted box) scores as the official loops score it; a NaN is an
    error naming the person."""
    with open(AIC_ANNOTATIONS) as f:
        ref = json.load(f)[:40]
    first, second = ref[0], ref[1]
    name = next(iter(first["keypoint_annotations"]))
    first["keypoint_annotations"][name][0] = -3                 # labelled joint, negative x
    name2 = next(iter(second["keypoint_annotations"]))
    second["keypoint_annotations"][name2][2] = 4                # visibility outside 1-3
    box = second["human_annotations"][name2]
    box[0], box[2] = box[2], box[0]                             # inverted box
    submit = perturbed_predictions(ref, np.random.default_rng(2))
    expected_score, expected_oks = official_score(ref, submit)
    result = score_predictions(ref, submit)
    assert result.score == pytest.approx(expected_score, abs=1e-12)
    np.testing.assert_allclose(result.oks, expected_oks, rtol=0, atol=1e-12)
    first["keypoint_annotations"][name][1] = float("nan")
    with pytest.raises(AnnotationError, match=rf"gt\.json: image '{first['image_id']}', person '{name}'.*not a finite"):
        score_predictions(ref, submit, ref_source="gt.json")
