"""Annotation readers (dataset/ai_challenger.py, dataset/coco.py): validation, drops, conversion."""

import copy
import json
import logging

import numpy as np
import pytest

from config.skeletons import AI_CHALLENGER, COCO
from conftest import AIC_ANNOTATIONS
from dataset.ai_challenger import read_ai_challenger
from dataset.coco import read_coco
from dataset.errors import AnnotationError


def write(tmp_path, obj, name="ann.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)

# ------------------------------------------------------------------------------ AI Challenger


def aic_person(vis=1):
    """14 joints at x = 10 + 10 j, y = 20 + j, all with file visibility ``vis``."""
    values = []
    for j in range(14):
        values += [10 + 10 * j, 20 + j, vis]
    return values


def aic_file():
    return [{"image_id": "img1", "url": "http://x",
             "human_annotations": {"human1": [5, 10, 160, 40], "human2": [0, 0, 50, 50]},
             "keypoint_annotations": {"human1": aic_person(), "human2": aic_person(2)}},
            {"image_id": "img2", "human_annotations": {}, "keypoint_annotations": {}}]


def set_value(data, image, key, person, index, value):
    data[image][key][person][index] = value
    return data


# Each case: a change to a valid file, and what the message must name besides the file.
AIC_BAD = {
    "top level not a list": (lambda d: {"images": d}, ["a JSON list of images"]),
    "missing key": (lambda d: [{k: v for k, v in d[0].items() if k != "human_annotations"}],
                    ["entry 0", "missing key 'human_annotations'"]),
    "image id not a string": (lambda d: [dict(d[0], image_id=12)], ["entry 0", "'image_id'", "12"]),
    "wrong keypoint count": (lambda d: set_value(d, 0, "keypoint_annotations", "human2", slice(0, 3), []),
                             ["'img1'", "'human2'", "expected 42 numbers, got 39"]),
    "non-numeric value": (lambda d: set_value(d, 0, "keypoint_annotations", "human2", 4, "20"),
                          ["'img1'", "'human2'", "right_elbow y", "not a number"]),
    "boolean value": (lambda d: set_value(d, 0, "keypoint_annotations", "human2", 3, True),
                      ["'img1'", "'human2'", "right_elbow x", "not a number"]),
    "keypoints without box": (lambda d: d[0]["human_annotations"].pop("human2") and d,
                              ["'img1'", "'human2'", "no box"]),
    "box without keypoints": (lambda d: d[0]["keypoint_annotations"].pop("human1") and d,
                              ["'img1'", "'human1'", "no keypoints"]),
    "duplicate image id": (lambda d: d + [copy.deepcopy(d[1])], ["'img2'", "duplicate image id"]),
}

# Problems of one person's values: (change, message fragments, the person, the counted reason).
AIC_PERSON_BAD = {
    "NaN": (lambda d: set_value(d, 0, "keypoint_annotations", "human1", 0, float("nan")),
            ["'img1'", "'human1'", "right_shoulder x", "not a finite number"], "human1", "non-finite keypoint value"),
    "infinity": (lambda d: set_value(d, 0, "human_annotations", "human1", 2, float("inf")),
                 ["'img1'", "'human1'", "box", "x2", "not a finite number"], "human1", "non-finite box value"),
    "negative labelled coordinate": (lambda d: set_value(d, 0, "keypoint_annotations", "human1", 40, -3),
                                     ["'img1'", "'human1'", "neck", "negative coordinate"], "human1",
                                     "negative coordinate on a labelled joint"),
    "visibility 0": (lambda d: set_value(d, 0, "keypoint_annotations", "human2", 5, 0),
                     ["'img1'", "'human2'", "right_elbow", "visibility 0"], "human2",
                     "visibility outside the format's set"),
    "visibility 4": (lambda d: set_value(d, 0, "keypoint_annotations", "human2", 41, 4),
                     ["'img1'", "'human2'", "neck", "visibility 4"], "human2", "visibility outside the format's set"),
    "box x2 < x1": (lambda d: set_value(d, 0, "human_annotations", "human2", 2, -1),
                    ["'img1'", "'human2'", "x2 < x1"], "human2", "inverted box"),
    "box y2 < y1": (lambda d: set_value(d, 0, "human_annotations", "human1", 3, 9),
                    ["'img1'", "'human1'", "y2 < y1"], "human1", "inverted box"),
}


@pytest.mark.parametrize("case", sorted(AIC_PERSON_BAD))
def test_ai_challenger_one_bad_person_is_dropped_counted_and_named_or_strict_raises(tmp_path, case, caplog):
    change, fragments, bad, reason = AIC_PERSON_BAD[case]
    path = write(tmp_path, change(aic_file()))
    with caplog.at_level(logging.WARNING, logger="dataset.errors"):
        records, stats = read_ai_challenger(path)
    good = {"human1", "human2"} - {bad}
    assert records[0].person_names == sorted(good) and stats.people == 1
    assert stats.dropped_people == {reason: 1}
    for fragment in [path] + fragments:
        assert fragment in caplog.text, (case, caplog.text)
    if "non-finite box" not in reason:                # its box stands as an ignore region
        box = change(aic_file())[0]["human_annotations"][bad]
        x1, x2 = sorted(box[0::2])
        y1, y2 = sorted(box[1::2])
        assert [[x1, y1, x2, y1, x2, y2, x1, y2]] in records[0].ignore_regions
    with pytest.raises(AnnotationError) as e:
        read_ai_challenger(path, strict=True)
    for fragment in [path] + fragments:
        assert fragment in str(e.value), (case, str(e.value))


@pytest.mark.parametrize("case", sorted(AIC_BAD))
def test_ai_challenger_bad_input_names_file_and_record(tmp_path, case):
    change, fragments = AIC_BAD[case]
    path = write(tmp_path, change(aic_file()))
    with pytest.raises(AnnotationError) as e:
        read_ai_challenger(path)
    for fragment in [path] + fragments:
        assert fragment in str(e.value), (case, str(e.value))


def test_ai_challenger_unreadable_or_malformed_json(tmp_path):
    with pytest.raises(AnnotationError, match=r"nope\.json: no such file"):
        read_ai_challenger(str(tmp_path / "nope.json"))
    path = write(tmp_path, '[{"image_id": "a"\n  "url": 1}]')
    with pytest.raises(AnnotationError, match=r"ann\.json: not valid JSON: Expecting ',' delimiter at line 2, column 3"):
        read_ai_challenger(path)


def test_ai_challenger_unlabelled_joints_are_not_checked_and_stored_with_vis_zero(tmp_path):
    data = aic_file()
    data[0]["keypoint_annotations"]["human1"][0:3] = [-5, 7, 3]    # negative but unlabelled: fine
    records, _ = read_ai_challenger(write(tmp_path, data), image_dir="/images")
    kp = records[0].keypoints
    assert records[0].image_path == "/images/img1.jpg"
    assert kp.dtype == np.float32 and kp.shape == (2, 14, 3)
    assert kp[0, 0].tolist() == [0, 0, 0]                          # unlabelled: vis 0, zeroed
    assert kp[0, 1].tolist() == [20, 21, 2]                        # file v = 1 -> visible (2)
    assert kp[1, 1].tolist() == [20, 21, 1]                        # file v = 2 -> occluded (1)
    assert records[0].boxes.tolist() == [[5, 10, 160, 40], [0, 0, 50, 50]]
    assert records[0].person_names == ["human1", "human2"]


def test_ai_challenger_untrainable_people_are_left_out_and_counted(tmp_path, caplog):
    data = aic_file()
    data[0]["keypoint_annotations"]["human3"] = aic_person(3)     # nobody labelled
    data[0]["human_annotations"]["human3"] = [0, 0, 10, 10]
    data[0]["human_annotations"]["human2"] = [7, 3, 7, 50]        # zero width
    data.append({"image_id": "img3", "human_annotations": {"h": [1, 1, 5, 1]},   # zero height
                 "keypoint_annotations": {"h": aic_person()}})
    with caplog.at_level(logging.INFO, logger="dataset.ai_challenger"):
        records, stats = read_ai_challenger(write(tmp_path, data))
    assert [r.image_id for r in records] == ["img1", "img2", "img3"]  # empty images stay
    assert [r.person_names for r in records] == [["human1"], [], []]
    assert records[2].keypoints.shape == (0, 14, 3) and records[2].boxes.shape == (0, 4)
    assert stats.images == 3 and stats.people == 1
    assert stats.dropped_people == {"no labelled joint": 1, "zero-size box": 2}
    assert stats.empty_images == 2
    summary = stats.summary()
    assert "no labelled joint: 1" in summary and "zero-size box: 2" in summary and "2 of the kept" in summary
    assert summary in caplog.text


def test_ai_challenger_example_file():
    records, stats = read_ai_challenger(AIC_ANNOTATIONS)
    assert len(records) == 1000
    assert sum(r.num_people for r in records) == 2761
    vis = np.concatenate([r.keypoints[..., 2].ravel() for r in records]).astype(int)
    # file v=1 (visible) 24158 -> 2, v=2 (occluded) 8578 -> 1, v=3 (unlabelled) 5918 -> 0
    assert np.bincount(vis, minlength=3).tolist() == [5918, 8578, 24158]
    assert stats.dropped_people == {} and stats.empty_images == 0
    with open(AIC_ANNOTATIONS) as f:
        first = json.load(f)[0]
    assert records[0].image_id == first["image_id"]
    np.testing.assert_array_equal(records[0].boxes, [first["human_annotations"][n] for n in records[0].person_names])

# ------------------------------------------------------------------------------ COCO


def coco_keypoints(labelled):
    """17 COCO joints; ``labelled`` maps joint index -> (x, y, v)."""
    values = [0] * 51
    for j, xyv in labelled.items():
        values[3 * j:3 * j + 3] = list(xyv)
    return values


RLE = {"counts": [0, 5, 10], "size": [480, 640]}
POLYGON = [[1, 1, 9, 1, 9, 9, 1, 9]]


def coco_file():
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 480},
                   {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80},
                   {"id": 3, "file_name": "c.jpg", "width": 30, "height": 20}],
        "categories": [{"id": 1, "name": "person", "keypoints": list(COCO.joint_names)},
                       {"id": 18, "name": "dog"}],
        "annotations": [
            # a person: nose visible (2), left wrist occluded (1)
            {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [10, 20, 30, 40],
             "keypoints": coco_keypoints({0: (15, 25, 2), 9: (30.5, 50, 1)}), "num_keypoints": 2,
             "segmentation": POLYGON},
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 100, 100],
             "keypoints": coco_keypoints({}), "segmentation": RLE},
            # a person with no labelled keypoint, with a polygon
            {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [200, 200, 10, 10],
             "keypoints": coco_keypoints({}), "num_keypoints": 0, "segmentation": POLYGON},
            {"id": 13, "image_id": 1, "category_id": 18, "bbox": [1, 1, 2, 2]},   # a dog
            # keypoint-less and without segmentation: its box stands in
            {"id": 14, "image_id": 2, "category_id": 1, "iscrowd": 0, "bbox": [2, 3, 4, 5],
             "keypoints": coco_keypoints({})},
        ]}


def test_coco_reads_people_crowds_and_keypointless_people(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dataset.coco"):
        records, stats = read_coco(write(tmp_path, coco_file()), image_dir="/coco")
    assert [r.image_id for r in records] == ["1", "2", "3"]
    a = records[0]
    assert a.image_path == "/coco/a.jpg" and (a.width, a.height) == (640, 480)
    assert a.person_names == ["10"]
    assert a.boxes.tolist() == [[10, 20, 40, 60]]                  # [x, y, w, h] -> x1, y1, x2, y2
    kp = a.keypoints[0]
    assert kp[COCO.index("nose")].tolist() == [15, 25, 2]          # COCO v=2 -> visible (2)
    assert kp[COCO.index("left_wrist")].tolist() == [30.5, 50, 1]  # COCO v=1 -> occluded (1)
    assert int((kp[:, 2] > 0).sum()) == 2
    assert a.ignore_regions == [RLE, POLYGON]                      # crowd 11, keypoint-less 12
    assert records[1].num_people == 0 and records[1].ignore_regions == [[[2, 3, 6, 3, 6, 8, 2, 8]]]
    assert records[2].num_people == 0 and records[2].ignore_regions == []
    assert stats.images == 3 and stats.people == 1 and stats.empty_images == 2
    assert stats.dropped_people == {"crowd (ignore region)": 1, "no labelled joint (ignore region)": 2}
    assert stats.summary() in caplog.text


def test_coco_zero_size_box_is_left_out(tmp_path):
    data = coco_file()
    data["annotations"][0]["bbox"] = [10, 20, 0, 40]
    records, stats = read_coco(write(tmp_path, data))
    assert records[0].num_people == 0 and stats.dropped_people["zero-size box"] == 1


COCO_BAD = {
    "not an object": (lambda d: [d], ["a JSON object"]),
    "missing annotations": (lambda d: {k: v for k, v in d.items() if k != "annotations"},
                            ["missing key 'annotations'"]),
    "other skeleton": (lambda d: d["categories"][0].update(keypoints=list(AI_CHALLENGER.joint_names)) or d,
                       ["category 1", "coco skeleton"]),
    "no person category": (lambda d: d.update(categories=[{"id": 18, "name": "dog"}]) or d,
                           ["no category named 'person'"]),
    "image without size": (lambda d: d["images"][1].pop("width") and d, ["images[1]", "missing key 'width'"]),
    "duplicate image id": (lambda d: d["images"].append(dict(d["images"][0])) or d,
                           ["image 1", "duplicate image id"]),
    "duplicate annotation id": (lambda d: d["annotations"][1].update(id=10) or d,
                                ["annotation 10", "duplicate annotation id"]),
    "unknown image": (lambda d: d["annotations"][0].update(image_id=99) or d, ["annotation 10", "99"]),
    "keypoint count": (lambda d: d["annotations"][0].update(keypoints=[1, 2, 2]) or d,
                       ["image 1", "annotation 10", "expected 51 numbers, got 3"]),
    "string coordinate": (lambda d: d["annotations"][0]["keypoints"].__setitem__(0, "15") or d,
                          ["image 1", "annotation 10", "nose x", "not a number"]),
}


@pytest.mark.parametrize("case", sorted(COCO_BAD))
def test_coco_bad_input_names_file_and_record(tmp_path, case):
    change, fragments = COCO_BAD[case]
    path = write(tmp_path, change(coco_file()))
    with pytest.raises(AnnotationError) as e:
        read_coco(path)
    for fragment in [path] + fragments:
        assert fragment in str(e.value), (case, str(e.value))


COCO_PERSON_BAD = {
    "negative bbox width": (lambda d: d["annotations"][0].update(bbox=[10, 20, -1, 40]) or d,
                            ["image 1", "annotation 10", "negative width"], "inverted box"),
    "visibility 3": (lambda d: d["annotations"][0]["keypoints"].__setitem__(2, 3) or d,
                     ["image 1", "annotation 10", "nose", "visibility 3"], "visibility outside the format's set"),
    "negative coordinate": (lambda d: d["annotations"][0]["keypoints"].__setitem__(27, -4) or d,
                            ["image 1", "annotation 10", "left_wrist", "negative coordinate"],
                            "negative coordinate on a labelled joint"),
    "NaN": (lambda d: d["annotations"][0]["keypoints"].__setitem__(1, float("nan")) or d,
            ["image 1", "annotation 10", "nose y", "not a finite number"], "non-finite keypoint value"),
}


@pytest.mark.parametrize("case", sorted(COCO_PERSON_BAD))
def test_coco_one_bad_person_is_dropped_counted_and_named_or_strict_raises(tmp_path, case, caplog):
    change, fragments, reason = COCO_PERSON_BAD[case]
    path = write(tmp_path, change(coco_file()))
    with caplog.at_level(logging.WARNING, logger="dataset.errors"):
        records, stats = read_coco(path)
    assert records[0].num_people == 0 and stats.people == 0          # annotation 10 was the only person
    assert stats.dropped_people[reason] == 1
    assert len(records[0].ignore_regions) == 3                        # crowd, keypoint-less, and its box
    for fragment in [path] + fragments:
        assert fragment in caplog.text, (case, caplog.text)
    with pytest.raises(AnnotationError) as e:
        read_coco(path, strict=True)
    for fragment in [path] + fragments:
        assert fragment in str(e.value), (case, str(e.value))


def test_coco_training_split_leaves_out_images_without_people(tmp_path):
    path = write(tmp_path, coco_file())
    kept, stats = read_coco(path, keep_empty=False)
    assert [r.image_id for r in kept] == ["1"]
    assert stats.dropped_images == {"no person to train on": 2} and stats.images == 1
    every, _ = read_coco(path)
    assert [r.image_id for r in every] == ["1", "2", "3"]
