"""AI Challenger <-> COCO conversion (dataset/convert.py, tools/convert_annotations.py)."""

import json
import logging
import os
import sys

import cv2
import numpy as np
import pytest

from conftest import AIC_ANNOTATIONS, ROOT
from dataset.coco import coco_records
from dataset.convert import aic_to_coco, coco_to_aic
from dataset.errors import AnnotationError

sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_annotations  # noqa: E402

# Joint orders written out from the two formats' documentation, independent of config/skeletons.py.
AIC_JOINTS = ["right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
              "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee",
              "left_ankle", "head_top", "neck"]
COCO_JOINTS = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
               "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
               "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"]
SHARED = [n for n in AIC_JOINTS if n in COCO_JOINTS]
AIC_V_TO_COCO_V = {1: 2, 2: 1, 3: 0}      # visible, occluded, unlabelled


def load_example():
    with open(AIC_ANNOTATIONS) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def example_coco():
    return aic_to_coco(load_example())


def test_aic_to_coco_maps_joints_boxes_and_visibility(example_coco):
    aic = load_example()
    assert len(SHARED) == 12
    assert [c["keypoints"] for c in example_coco["categories"]] == [COCO_JOINTS]
    assert len(example_coco["images"]) == 1000 and len(example_coco["annotations"]) == 2761
    images = {im["id"]: im for im in example_coco["images"]}
    anns = iter(example_coco["annotations"])
    for entry in aic:
        for name, kps in entry["keypoint_annotations"].items():
            ann = next(anns)
            assert images[ann["image_id"]]["file_name"] == entry["image_id"] + ".jpg"
            x1, y1, x2, y2 = entry["human_annotations"][name]
            assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]
            assert ann["area"] == (x2 - x1) * (y2 - y1)
            labelled = 0
            for joint in COCO_JOINTS:
                got = ann["keypoints"][3 * COCO_JOINTS.index(joint):][:3]
                if joint in AIC_JOINTS:
                    x, y, v = kps[3 * AIC_JOINTS.index(joint):][:3]
                    want = [0, 0, 0] if v == 3 else [x, y, AIC_V_TO_COCO_V[v]]
                    labelled += v != 3
                else:
                    want = [0, 0, 0]          # face joints: no AI Challenger counterpart
                assert got == want, (entry["image_id"], name, joint)
            assert ann["num_keypoints"] == labelled and ann["iscrowd"] == 0


def test_aic_to_coco_estimates_missing_sizes_with_a_warning(caplog):
    aic = load_example()[:3]
    with caplog.at_level(logging.WARNING, logger="dataset.convert"):
        coco = aic_to_coco(aic)
    assert "3 of 3 images have no known size" in caplog.text
    for entry, image in zip(aic, coco["images"]):
        # smallest size holding every box corner and labelled joint: floor(max) + 1
        xs = [b[0] for b in entry["human_annotations"].values()] + [b[2] for b in entry["human_annotations"].values()]
        ys = [b[1] for b in entry["human_annotations"].values()] + [b[3] for b in entry["human_annotations"].values()]
        for kps in entry["keypoint_annotations"].values():
            xs += [kps[i] for i in range(0, 42, 3) if kps[i + 2] != 3]
            ys += [kps[i + 1] for i in range(0, 42, 3) if kps[i + 2] != 3]
        assert (image["width"], image["height"]) == (int(max(xs)) + 1, int(max(ys)) + 1)
    caplog.clear()
    given = {aic[0]["image_id"]: (800, 700)}
    coco = aic_to_coco(aic, image_sizes=given)
    assert (coco["images"][0]["width"], coco["images"][0]["height"]) == (800, 700)


def test_coco_output_reads_back_through_pycocotools(example_coco):
    records, stats = coco_records(example_coco, "converted")
    assert len(records) == 1000 and stats.people == 2761


def test_round_trip_aic_coco_aic_keeps_shared_joints_boxes_visibility(example_coco):
    aic = load_example()
    back = coco_to_aic(json.loads(json.dumps(example_coco)))
    assert [e["image_id"] for e in back] == [e["image_id"] for e in aic]
    for before, after in zip(aic, back):
        names = list(before["keypoint_annotations"])
        assert list(after["keypoint_annotations"]) == [f"human{k + 1}" for k in range(len(names))]
        for k, name in enumerate(names):
            new = f"human{k + 1}"
            assert after["human_annotations"][new] == before["human_annotations"][name]
            old_kp, new_kp = before["keypoint_annotations"][name], after["keypoint_annotations"][new]
            for j, joint in enumerate(AIC_JOINTS):
                if joint in SHARED:
                    assert new_kp[3 * j:3 * j + 3] == old_kp[3 * j:3 * j + 3], (before["image_id"], name, joint)
                else:
                    assert new_kp[3 * j:3 * j + 3] == [0, 0, 3]   # head_top, neck: not in COCO


def test_coco_to_aic_small_file():
    coco = {"images": [{"id": 397133, "file_name": "000000397133.jpg", "width": 640, "height": 427}],
            "categories": [{"id": 1, "name": "person", "keypoints": COCO_JOINTS}],
            "annotations": [
                {"id": 5, "image_id": 397133, "category_id": 1, "iscrowd": 0, "bbox": [10.5, 20, 30, 40],
                 "keypoints": [50, 60, 2] + [0] * 15 + [70, 80, 1] + [0] * 30},   # nose, right_shoulder
                {"id": 6, "image_id": 397133, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 9, 9],
                 "keypoints": [0] * 51, "segmentation": {"counts": [0, 81], "size": [427, 640]}}]}
    (entry,) = coco_to_aic(coco)
    assert entry["image_id"] == "000000397133"                  # the file stem
    assert entry["human_annotations"] == {"human1": [10.5, 20, 40.5, 60]}   # crowd not written
    kp = entry["keypoint_annotations"]["human1"]
    expected = [0, 0, 3] * 14
    expected[0:3] = [70, 80, 2]                                  # right_shoulder, COCO v=1 -> AIC 2
    assert kp == expected                                        # nose has no AIC joint: lost
    # and back: the decimal file stem becomes the COCO id again
    again = aic_to_coco([entry], image_sizes={"000000397133": (640, 427)})
    assert again["images"] == [{"id": 397133, "file_name": "000000397133.jpg", "width": 640, "height": 427}]


def test_converter_rejects_bad_input_through_the_readers():
    with pytest.raises(AnnotationError, match=r"in\.json: image 'a', person 'h': keypoints: expected 42 numbers"):
        aic_to_coco([{"image_id": "a", "human_annotations": {"h": [0, 0, 1, 1]},
                      "keypoint_annotations": {"h": [1, 2, 1]}}], source="in.json")
    with pytest.raises(AnnotationError, match="missing key 'categories'"):
        coco_to_aic({"images": [], "annotations": []})


def test_tool_reads_image_sizes_from_files(tmp_path, capsys):
    aic = load_example()[:2]
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    sizes = [(700, 650), (1024, 768)]
    for entry, (w, h) in zip(aic, sizes):
        cv2.imwrite(str(image_dir / (entry["image_id"] + ".jpg")), np.zeros((h, w, 3), np.uint8))
    src, out, back = tmp_path / "aic.json", tmp_path / "coco.json", tmp_path / "back.json"
    src.write_text(json.dumps(aic))
    assert convert_annotations.main(["--to", "coco", "--in", str(src), "--out", str(out),
                                     "--images", str(image_dir)]) == 0
    coco = json.loads(out.read_text())
    assert [(im["width"], im["height"]) for im in coco["images"]] == sizes
    assert convert_annotations.main(["--to", "aic", "--in", str(out), "--out", str(back)]) == 0
    assert [e["image_id"] for e in json.loads(back.read_text())] == [e["image_id"] for e in aic]
    os.remove(image_dir / (aic[1]["image_id"] + ".jpg"))
    assert convert_annotations.main(["--to", "coco", "--in", str(src), "--out", str(out),
                                     "--images", str(image_dir)]) == 1
    assert aic[1]["image_id"] + ".jpg: no such image" in capsys.readouterr().err
    assert convert_annotations.main(["--to", "aic", "--in", str(src), "--out", str(back)]) == 1
    assert "already in the aic format" in capsys.readouterr().err     # an AIC file given as COCO
