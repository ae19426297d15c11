"""Command-line tools on a tiny run directory: outputs, scores and bad input."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import ROOT
from training_helpers import load_tool, random_head_run, run_tool, subprocess_env


def _run(tool, *args, timeout=300):
    """The command line in its own process (the error paths: exit code and message from the real
    entry point; the other tests call the tool's main() in this process, ``run_tool``)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=subprocess_env())


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory):
    """A tiny run directory (random output layers, so people are found) and a small AI
    Challenger-format image set (4 validation pictures; the tests that need an unreadable one
    make it in their own folder)."""
    from dataset.synthetic import generate_synthetic_dataset

    base = tmp_path_factory.mktemp("tools")
    run = str(base / "run")
    random_head_run(run, score_threshold=0.0, max_people=4)
    paths = generate_synthetic_dataset(str(base / "synth"), num_train=1, num_val=4, seed=3)
    return run, paths


def test_model_val_writes_predictions_and_the_official_score(run_and_data, tmp_path):
    run, paths = run_and_data
    out = tmp_path / "pred.json"
    r = run_tool("model_val.py", "--ckpt", run, "--json", paths.val_json, "--images", paths.val_images,
                 "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    preds = json.load(open(out))
    assert result["predicted_images"] == 4 == len(preds)
    counts = [len(p["keypoint_annotations"]) for p in preds]
    assert max(counts) <= 4 and sum(counts) > 0                         # max_people of the run
    # the printed score is the official scorer's on the written file
    from utils.aic_eval import evaluate_files

    assert result["score"] == pytest.approx(evaluate_files(paths.val_json, str(out)).score, abs=1e-12)
    assert "AI Challenger score:" in r.stdout


def test_model_val_skips_an_unreadable_picture_and_the_scorer_counts_it_missed(run_and_data, tmp_path):
    """One of the four pictures corrupt: a warning naming it, three predicted, and the official
    score of the written file counts the fourth image's people as missed."""
    run, paths = run_and_data
    folder, names = _copy_pictures(paths, tmp_path)
    (folder / names[1]).write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "pred.json"
    r = run_tool("model_val.py", "--ckpt", run, "--json", paths.val_json, "--images", folder, "--out", out,
                 "--batch-size", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert names[1] in r.stderr and "corrupt image" in r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    preds = json.load(open(out))
    assert result["predicted_images"] == 3 == len(preds)
    assert os.path.splitext(names[1])[0] not in {p["image_id"] for p in preds}
    from utils.aic_eval import evaluate_files

    assert result["score"] == pytest.approx(evaluate_files(paths.val_json, str(out)).score, abs=1e-12)


def test_main_with_a_missing_finetune_file_stops_before_training(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--run-dir", str(tmp_path / "run"),
                        "--finetune", str(tmp_path / "nope.weights.h5"), "--epochs", "1", "--steps-per-epoch", "1",
                        "--synthetic-dir", str(tmp_path / "synth"), "--synthetic-train-images", "8",
                        "--synthetic-val-images", "2", "--input-height", "64", "--input-width", "64"],
                       capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "nope.weights.h5" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_model_val_refuses_a_model_of_another_skeleton(run_and_data, tmp_path):
    run, paths = run_and_data
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}],
                                "annotations": [], "categories": [{"id": 1, "name": "person"}]}))
    r = _run("model_val.py", "--ckpt", run, "--json", coco, "--images", tmp_path)
    assert r.returncode == 2
    assert "ai_challenger skeleton" in r.stderr and "coco skeleton" in r.stderr
    assert "Traceback" not in r.stderr


def _copy_pictures(paths, tmp_path, count=None):
    """A folder with copies of the first ``count`` (all) validation pictures, and their names."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = sorted(os.listdir(paths.val_images))[:count]
    for n in names:
        (folder / n).write_bytes(open(os.path.join(paths.val_images, n), "rb").read())
    return folder, names


def test_spm_model_test_draws_pictures_in_batches_and_skips_unreadable_images(run_and_data, tmp_path):
    """--batch-size 3 over a folder of 4 pictures and a broken one (two batches, the broken one
    inside the first): every readable picture drawn, and its poses in --json those of the
    Python path run one picture at a time."""
    run, paths = run_and_data
    folder, names = _copy_pictures(paths, tmp_path)
    (folder / "a_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out, out_json = tmp_path / "out", tmp_path / "poses.json"
    r = run_tool("spm_model_test.py", "--ckpt", run, "--imgs", folder, "--output", out, "--batch-size", "3",
                 "--json", out_json)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "a_broken.jpg: corrupt image: OpenCV cannot decode it, skipped" in r.stderr
    written = sorted(os.listdir(out))
    assert written == sorted(os.path.splitext(n)[0] + "_spm.png" for n in names)
    drawn = cv2.imread(str(out / written[0]))
    original = cv2.imread(os.path.join(paths.val_images, names[0]))
    assert drawn.shape == original.shape and np.any(drawn != original)   # skeletons were drawn
    assert "latency per frame" in r.stdout
    from dataset.pipeline import read_rgb
    from utils import predict

    model, cfg = predict.load_trained_model(run)
    predictor = predict.Predictor(model, cfg)
    got = {e["image_id"]: e["keypoint_annotations"] for e in json.load(open(out_json))}
    assert sorted(got) == sorted(os.path.splitext(n)[0] for n in names)
    for n in names:
        want, = predict.predict_images(predictor, [read_rgb(os.path.join(folder, n))])
        people = got[os.path.splitext(n)[0]]
        assert len(people) == len(want.poses)
        if people:
            poses = np.array(list(people.values())).reshape(len(people), -1, 3)[..., :2]
            np.testing.assert_allclose(poses, want.poses, atol=0.01)


def test_spm_model_test_on_an_empty_folder_fails_clearly(run_and_data, tmp_path):
    run, _ = run_and_data
    r = _run("spm_model_test.py", "--ckpt", run, "--imgs", tmp_path, "--output", tmp_path / "out")
    assert r.returncode == 2 and "holds no image" in r.stderr and "Traceback" not in r.stderr


class _OddFrames:
    """cv2.VideoCapture whose frames lose their last row and column: a video of odd width and
    height as the tool reads one (OpenCV's writers here round the sides of a clip down to even)."""

    def __init__(self, path, capture=cv2.VideoCapture):
        self.cap = capture(path)

    def isOpened(self):
        return self.cap.isOpened()

    def get(self, prop):
        return self.cap.get(prop)

    def read(self):
        ok, frame = self.cap.read()
        return ok, (frame[:-1, :-1] if ok else frame)

    def release(self):
        self.cap.release()


@pytest.mark.parametrize("odd", [False, True])
def test_spm_model_test_writes_a_video(run_and_data, tmp_path, monkeypatch, odd):
    """--video: every frame of the clip, the Python path's poses drawn on it (to the codecs'
    loss, which is far below what the drawing changes). Frames of odd width and height (which
    MPEG-4 cannot hold) are written one row and column larger, the picture whole at the top left."""
    run, paths = run_and_data
    first = cv2.imread(os.path.join(paths.val_images, sorted(os.listdir(paths.val_images))[0]))
    first = first[:first.shape[0] // 2 * 2, :first.shape[1] // 2 * 2]      # the clip: even sides
    clip = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(clip, cv2.VideoWriter_fourcc(*"MJPG"), 5, (first.shape[1], first.shape[0]))
    for _ in range(3):
        writer.write(first)
    writer.release()
    source = cv2.VideoCapture(clip).read()[1]                                 # the frame the tool reads
    with monkeypatch.context() as patch:
        if odd:
            patch.setattr(cv2, "VideoCapture", _OddFrames)
            source = source[:-1, :-1]
        r = run_tool("spm_model_test.py", "--ckpt", run, "--video", clip, "--output", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    h, w = source.shape[:2]
    cap = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame.astype(np.float32))
    assert len(frames) == 3 and frames[0].shape == (h + odd, w + odd, 3)
    assert (f"{w}x{h} frames written as {w + 1}x{h + 1}" in r.stdout) == odd
    assert "3 frames in" in r.stdout and "frames/s" in r.stdout
    from utils import predict
    from utils.drawing import draw_prediction

    source = cv2.cvtColor(source, cv2.COLOR_BGR2RGB)
    model, cfg = predict.load_trained_model(run)
    prediction, = predict.predict_images(predict.Predictor(model, cfg), [source])
    assert len(prediction.poses) > 0
    expected = cv2.cvtColor(draw_prediction(source, prediction, cfg.skeleton), cv2.COLOR_RGB2BGR).astype(np.float32)
    undrawn = cv2.cvtColor(source, cv2.COLOR_RGB2BGR).astype(np.float32)
    drawn = np.abs(expected - undrawn).max(axis=-1) > 60                       # the skeletons' pixels
    assert drawn.mean() > 0.002
    for frame in frames:
        error = np.abs(frame[:h, :w] - expected).max(axis=-1)[drawn]
        # measured: median 16-32 against the drawn picture, 108-122 against the undrawn one
        assert np.median(error) < 0.5 * np.median(np.abs(frame[:h, :w] - undrawn).max(axis=-1)[drawn])
        if odd:              # the added row and column repeat the last ones (to the codec's loss)
            assert np.abs(frame[h] - frame[h - 1]).mean() < 8 and np.abs(frame[:, w] - frame[:, w - 1]).mean() < 8


def test_spm_model_test_json_with_flip_scales_and_long_side_gives_the_python_poses(run_and_data, tmp_path):
    """--json with --flip --scales 1,2 --long-side 320: each picture's poses in its own pixels,
    under its file stem, as the Python path gives them; model_val takes the same flags."""
    run, paths = run_and_data
    folder, names = _copy_pictures(paths, tmp_path, 2)
    out_json = tmp_path / "poses.json"
    flags = ["--flip", "--scales", "1,2", "--long-side", "320"]
    r = run_tool("spm_model_test.py", "--ckpt", run, "--imgs", folder, "--output", tmp_path / "out",
                 "--json", out_json, "--score", "0", *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    got = {e["image_id"]: e["keypoint_annotations"] for e in json.load(open(out_json))}
    assert sorted(got) == sorted(os.path.splitext(n)[0] for n in names)
    from dataset.pipeline import read_rgb
    from utils import predict

    model, cfg = predict.load_trained_model(run, overrides={"score_threshold": 0.0})
    predictor = predict.Predictor(model, cfg, flip=True, scales=(1.0, 2.0))
    for n in names:
        image = read_rgb(os.path.join(folder, n))
        want, = predict.predict_images(predictor, [image], long_side=320)
        people = got[os.path.splitext(n)[0]]
        assert len(people) == len(want.poses) > 0
        poses = np.array([v for v in people.values()]).reshape(len(people), -1, 3)[..., :2]
        np.testing.assert_allclose(poses, want.poses, atol=0.01)      # rounded to 0.01 px in the file
    r = run_tool("model_val.py", "--ckpt", run, "--json", paths.val_json, "--images", paths.val_images,
                 "--out", tmp_path / "pred.json", *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["scales"] == [1.0, 2.0] and result["long_side"] == 320 and result["predicted_images"] == 4


def test_multiscale_benchmark_puts_people_on_a_larger_canvas_and_scores_each_setting(run_and_data, tmp_path):
    """``benchmark.py multiscale --canvas 2``: each picture at the centre of a canvas twice its
    size with its annotations shifted by the same offset, and each row the official score of
    predict_records at those scales on the kept set."""
    run, paths = run_and_data
    keep = tmp_path / "canvas"
    r = run_tool("benchmark.py", "multiscale", "--ckpt", run, "--json", paths.val_json, "--images", paths.val_images,
                 "--scales", "1", "1,2", "--keep", keep, "--limit", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"scales"')]
    assert [row["scales"] for row in rows] == [[1.0], [1.0, 2.0]]
    before, after = json.load(open(paths.val_json))[0], json.load(open(keep / "annotations.json"))[0]
    small = cv2.imread(os.path.join(paths.val_images, before["image_id"] + ".jpg"))
    big = cv2.imread(str(keep / "images" / (before["image_id"] + ".jpg")))
    assert big.shape[:2] == (2 * small.shape[0], 2 * small.shape[1])
    dy, dx = (big.shape[0] - small.shape[0]) // 2, (big.shape[1] - small.shape[1]) // 2
    assert np.abs(big[dy:dy + small.shape[0], dx:dx + small.shape[1]].astype(int) - small).mean() < 3
    person = next(iter(before["keypoint_annotations"]))
    k0, k1 = np.reshape(before["keypoint_annotations"][person], (-1, 3)), np.reshape(after["keypoint_annotations"][person], (-1, 3))
    np.testing.assert_allclose(k1[:, :2], k0[:, :2] + [dx, dy])
    from dataset.ai_challenger import read_ai_challenger
    from utils import predict
    from utils.evaluation import score_aic

    model, cfg = predict.load_trained_model(run)
    records, _ = read_ai_challenger(str(keep / "annotations.json"), str(keep / "images"))
    predictions, _ = predict.predict_records(predict.Predictor(model, cfg, scales=(1.0, 2.0)), records)
    want = score_aic(str(keep / "annotations.json"), predictions, [x.image_id for x in records])
    assert rows[1]["score"] == pytest.approx(want["score"], abs=1e-4)


def test_oracle_benchmark_scores_a_coco_file_with_either_hierarchy(tmp_path):
    """``benchmark.py oracle`` on the real COCO photographs: the encode -> decode round trip of
    their ground truth scores COCO AP 1.0 with the hand-written coco tree and with the tree
    derived from the file's edges (``"hierarchy": "derived"``), whose face hangs from the ears."""
    photos = os.path.join(ROOT, "tests", "data", "real_photos")
    ref = os.path.join(photos, "coco_person_keypoints.json")
    category = json.load(open(ref))["categories"][0]
    derived = tmp_path / "derived.json"
    derived.write_text(json.dumps({"keypoints": category["keypoints"], "skeleton": category["skeleton"],
                                   "hierarchy": "derived"}))
    depths = {}
    for skeleton in ("coco", str(derived)):
        r = run_tool("benchmark.py", "oracle", "--ref", ref, "--images", photos, "--out", tmp_path / "o.json",
                     "--dataset", "coco", "--skeleton", skeleton, "--input", "256x256")
        assert r.returncode == 0, r.stderr[-2000:]
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        assert summary["metric"] == "COCO AP" and summary["score"] == pytest.approx(1.0)
        assert summary["decoded_people"] == summary["reference_people"] == 3
        depths[skeleton] = summary["face_depths"]
    assert depths["coco"] == {"nose": 1, "left_eye": 2, "left_ear": 3}
    assert depths[str(derived)] == {"nose": 4, "left_eye": 3, "left_ear": 2}


def test_pipeline_benchmark_runs_on_a_coco_annotation_file(tmp_path):
    """``benchmark.py pipeline --json --images --dataset coco``: the realistic benchmark on any
    annotation file; the numbers it prints describe the batches the pipeline really made."""
    from dataset.synthetic import generate_synthetic_dataset

    paths = generate_synthetic_dataset(str(tmp_path / "synth"), num_train=12, num_val=1, seed=5)
    r = run_tool("benchmark.py", "pipeline", "--json", paths.train_coco_json, "--images", paths.train_images,
                 "--dataset", "coco", "--preset", "tiny_synthetic", "--input", "64x64", "--batch-size", "4",
                 "--batches", "3", "--rounds", "1", "--stage-images", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["images_per_s"] > 0 and out["decode_only_images_per_s"] > 0
    assert out["ratio"] == pytest.approx(out["images_per_s"] / out["decode_only_images_per_s"], abs=1e-3)
    J, P = 17, 32                                      # COCO joints, default person slots
    labels = P * J * 3 * 4 + P * 4 * 4 + 16 * 2 + 2 * 4  # keypoints, boxes, ignore bits (16 x 16 cells), colour
    assert out["host_bytes_per_image"] == 64 * 64 * 3 + labels
    # root, root weight, displacements and their weights, joint heatmaps and theirs (the preset's)
    assert out["target_bytes_per_image_if_sent"] == 16 * 16 * (1 + 1 + 2 * J + 2 * J + J + J) * 4
    assert set(out["stage_ms_per_image"]) >= {"decode_jpeg", "augment_batch", "batch_total"}


def test_recipe_variants_keep_the_preset_geometry_and_scale_its_schedule():
    """``benchmark.py recipe``: each variant is the preset at its own input size and SPR settings
    with the rehearsal's trunk, the step schedule's decays at the preset's fractions of the run."""
    import argparse

    from tools.benchmarks.recipe import DEFAULT_VARIANTS, parse_variant, variant_config

    args = argparse.Namespace(backbone="hrnet_tiny", head_channels=32, head_blocks=1, batch_size=4,
                              steps=400, evals=2, val_images=50, seed=0, input=0, synthetic_dir="",
                              synthetic_images="", lr=0.0, tiny_width=16, real_photos=False)
    configs = {}
    for text in DEFAULT_VARIANTS:
        name, fields = parse_variant(text)
        configs[name] = variant_config("ai_challenger_w32_512", fields, args, "/tmp/unused")
    paper, step, preset = configs["paper"], configs["step"], configs["preset"]
    assert (paper.data.input_height, paper.spr.sigma, paper.spr.tau) == (512, 7.0, 7.0)
    assert paper.model.backbone == "hrnet_tiny" and paper.data.dataset == "synthetic"
    assert paper.loss.disp_loss_weight == 0.01 and paper.loss.root_loss == "l2"
    assert not paper.model.joint_heatmaps and paper.train.lr_schedule == "step"
    assert paper.train.steps_per_epoch * paper.train.epochs == 400
    assert step.train.lr_decay_epochs == (6, 8)                     # 90 and 120 of 150 epochs
    assert step.train.warmup_steps == 0 and step.model.joint_heatmaps
    # the preset: heatmaps, cosine warmed up for 5% of the rehearsal
    assert preset.model.joint_heatmaps and preset.train.lr_schedule == "cosine" and preset.train.warmup_steps == 20
    assert (preset.loss.disp_loss_weight, preset.loss.root_loss) == (1.0, "focal")
    assert (preset.data.seed, configs["preset_seed1"].data.seed) == (0, 1)
    assert not configs["no_heatmaps"].model.joint_heatmaps and configs["no_heatmaps"].train.lr_schedule == "cosine"
    assert configs["person"].loss.disp_loss_norm == "person" and preset.loss.disp_loss_norm == "cells"
    with pytest.raises(SystemExit, match="not name:field=value"):
        parse_variant("no_colon")
    with pytest.raises(SystemExit, match="unknown config field"):
        variant_config("ai_challenger_w32_512", {"no_such_field": "1"}, args, "/tmp/unused")


def test_recipe_trains_each_variant_and_reports_its_score_curve(tmp_path):
    """A short rehearsal end to end, on the real COCO photographs (--real-photos: the COCO reader
    and COCO AP): a variant trained and scored twice by the training loop's evaluator (the other
    variant is left out by --only); the table's numbers are the curve's end."""
    r = run_tool("benchmark.py", "recipe", "--steps", "20", "--evals", "2", "--batch-size", "2",
                 "--input", "64", "--real-photos", "--head-channels", "8",
                 "--variants", "a:disp_loss_weight=0.01", "b:disp_loss_weight=1.0,joint_heatmaps=true",
                 "--only", "b", "--out", str(tmp_path / "recipe.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.load(open(tmp_path / "recipe.json"))
    assert [row["variant"] for row in out["rows"]] == ["b"] and out["input"] == "64x64"
    assert out["data"] == "real_photos"
    row, = out["rows"]
    assert row["steps"] == 20 and [c["step"] for c in row["curve"]] == [10, 20] and row["seconds"] > 0
    # the curve is the run's own history, its end the score of the run's final weights
    history = [h for h in json.load(open(os.path.join(row["run_dir"], "history.json"))) if "score" in h]
    assert [c["score"] for c in row["curve"]] == [round(h["score"], 4) for h in history]
    assert row["score"] == row["curve"][-1]["score"]
    from utils.evaluation import evaluate_model
    from utils.predict import load_trained_model

    model, cfg = load_trained_model(os.path.join(row["run_dir"], "final.weights.h5"))
    assert cfg.model.joint_heatmaps is True and cfg.loss.disp_loss_weight == 1.0       # variant b's fields
    assert row["score"] == pytest.approx(evaluate_model(model, cfg)["score"], abs=1e-3)
    assert "| b | 20 |" in r.stdout and "| a |" not in r.stdout


def test_plot_history_draws_a_run_and_refuses_a_folder_without_one(tmp_path):
    from training_helpers import tiny_config

    run = tmp_path / "run"
    tiny_config(str(run), joint_heatmaps=True).save(str(run))
    history = [{"epoch": e, "step": 10 * e, "loss_root": 2.0 / e, "loss_disp": 30.0 / e, "loss_joints": 90.0 / e,
                "score": 0.1 * e, "ap50": 0.2 * e, "ap75": 0.05 * e} for e in (1, 2, 3)]
    (run / "history.json").write_text(json.dumps(history))
    r = run_tool("plot_history.py", "--run", run, "--out", tmp_path / "curve.png")
    assert r.returncode == 0, r.stderr[-2000:]
    picture = cv2.imread(str(tmp_path / "curve.png"))
    assert picture is not None and picture.shape[1] > 600 and picture.std() > 10
    assert json.loads(r.stdout.strip().splitlines()[-1])["score"] == pytest.approx(0.3)
    bad = _run("plot_history.py", "--run", tmp_path / "empty", "--out", tmp_path / "x.png")
    assert bad.returncode == 2 and "no history" in bad.stderr and "Traceback" not in bad.stderr


def test_make_synthetic_writes_both_formats_the_same_for_any_number_of_threads(tmp_path, capsys):
    """tools/make_synthetic.py: the pictures and both annotation files of the requested sizes;
    the same bytes with 1 or 2 rendering threads, other pictures with another seed; the COCO
    file holds the AI Challenger file's people."""
    tool = load_tool("make_synthetic")
    for name, workers, seed in (("one", 1, 3), ("two", 2, 3), ("other", 1, 4)):
        assert tool.main(["--out", str(tmp_path / name), "--train", "3", "--val", "2", "--seed", str(seed),
                          "--workers", str(workers)]) == 0
    one, two, other = (tmp_path / n for n in ("one", "two", "other"))
    assert len(os.listdir(one / "train")) == 3 and len(os.listdir(one / "val")) == 2
    for rel in ("train.json", "val.json", "train_coco.json", "val_coco.json",
                *(f"{split}/{f}" for split in ("train", "val") for f in sorted(os.listdir(one / split)))):
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
    first = sorted(os.listdir(one / "train"))[0]
    other_first = sorted(os.listdir(other / "train"))[0]
    assert (one / "train" / first).read_bytes() != (other / "train" / other_first).read_bytes()
    aic = json.load(open(one / "val.json"))
    coco = json.load(open(one / "val_coco.json"))
    assert len(coco["images"]) == len(aic) == 2
    assert len(coco["annotations"]) == sum(len(a["keypoint_annotations"]) for a in aic)


def test_dataset_test_draws_the_chosen_records_and_their_root_peaks(run_and_data, tmp_path, capsys):
    """tools/dataset_test.py --num 2 --start 1: two PNGs named by index and image id, the three
    panels at 4x the 128 input (at least 512 pixels), one root peak per annotated person;
    --augmented is a function of --seed; an index past the file is one line and exit 1."""
    from dataset.ai_challenger import read_ai_challenger

    _, paths = run_and_data
    records, _ = read_ai_challenger(paths.val_json, paths.val_images)
    tool = load_tool("dataset_test")
    common = ["--json", paths.val_json, "--images", paths.val_images, "--num", "2", "--start", "1",
              "--input-height", "128", "--input-width", "128"]
    assert tool.main([*common, "--out", str(tmp_path / "plain")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == {"out": str(tmp_path / "plain"), "images": 2}
    names = [f"{i:04d}_{records[i].image_id}.png" for i in (1, 2)]
    assert sorted(os.listdir(tmp_path / "plain")) == names
    for i, name in zip((1, 2), names):
        assert cv2.imread(str(tmp_path / "plain" / name)).shape == (512, 3 * 512, 3)
        n = records[i].num_people
        assert f"{tmp_path / 'plain' / name}: {n} people annotated, {n} root peaks" in out
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert tool.main([*common, "--out", str(tmp_path / name), "--augmented", "--seed", str(seed)]) == 0
    pictures = {d: (tmp_path / d / names[0]).read_bytes() for d in ("plain", "a", "b", "c")}
    assert pictures["a"] == pictures["b"] and pictures["a"] != pictures["c"] and pictures["a"] != pictures["plain"]
    capsys.readouterr()
    assert tool.main(["--json", paths.val_json, "--images", paths.val_images, "--start", "9",
                      "--out", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dataset_test: error: {paths.val_json}: no image at index 9 (the file has 4)"]


def test_model_val_drops_a_person_with_bad_values_or_refuses_it_with_strict_annotations(run_and_data, tmp_path,
                                                                                        capsys, caplog):
    """A person with an impossible visibility code (5) in the validation file: by default left
    out, counted and named in the log, the other images predicted and scored;
    ``--strict-annotations``: exit 2, one line naming the file and the person."""
    import logging

    run, paths = run_and_data
    data = json.load(open(paths.val_json))
    person = sorted(data[0]["keypoint_annotations"])[0]
    data[0]["keypoint_annotations"][person][2] = 5
    bad = tmp_path / "val_bad.json"
    bad.write_text(json.dumps(data))
    tool = load_tool("model_val")
    args = ["--ckpt", run, "--json", str(bad), "--images", paths.val_images, "--out", str(tmp_path / "p.json")]
    with caplog.at_level(logging.WARNING):
        assert tool.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == result["predicted_images"] == 4 and "score" in result
    dropped = [r.getMessage() for r in caplog.records if "dropped 1 person" in r.getMessage()]
    assert len(dropped) == 1 and str(bad) in dropped[0] and "--strict-annotations" in dropped[0]
    assert tool.main([*args, "--strict-annotations"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0] and person in err[0], err
