"""Joint heatmaps (--joint-heatmaps, beyond the paper): targets, loss, snapping in the decoder,
the training path's flips, and the refined poses of the exported model (``export.py --flip
--onnx``: SavedModel, TFLite, ONNX)."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from config import get_preset
from config.skeletons import VIS_UNLABELLED
from nets import spr
from nets.losses import spm_loss

SK = get_preset("tiny_synthetic").skeleton
J = SK.num_joints
NECK, HEAD = SK.index("neck"), SK.index("head_top")


def _cfg(**overrides):
    base = dict(joint_heatmaps=True, input_height=64, input_width=64, sigma=1.5, tau=3.0,
                joint_sigma=1.5, snap_radius=2.0, snap_threshold=0.1)
    return get_preset("tiny_synthetic").replace(**{**base, **overrides})


def _person(rng, centre, size=20.0):
    """A person's keypoints [J, 3] (network-input pixels, all labelled) around ``centre``."""
    kp = np.zeros((J, 3), np.float32)
    kp[:, :2] = centre + rng.uniform(-size, size, (J, 2))
    kp[:, 2] = 1
    return kp


def _encode(keypoints, cfg, ignore=None):
    kp = np.asarray(keypoints, np.float32)
    boxes = np.zeros(kp.shape[:2] + (4,), np.float32)
    boxes[..., 2:] = 64
    return {k: v.numpy() for k, v in spr.encode_batch(kp, boxes, SK, cfg.spr, (64, 64), ignore=ignore,
                                                       heatmaps=True).items()}


def test_heatmap_targets_peak_on_labelled_joints_and_stay_empty_for_unlabelled_ones():
    cfg = _cfg()
    rng = np.random.default_rng(0)
    people = np.stack([_person(rng, np.array([16.0, 16.0]), 12.0), _person(rng, np.array([48.0, 48.0]), 12.0)])
    people[1, HEAD] = [0, 0, VIS_UNLABELLED]                 # unlabelled in one person
    people[0, NECK, :2] = [13.3, 27.9]                      # a known sub-pixel spot
    t = _encode(people[None], cfg)
    heat = t["heatmaps"][0]
    assert heat.shape == (16, 16, J) and t["heatmap_weight"].shape == (1, 16, 16, J)
    # the neck's cell holds the Gaussian of the exact joint: exp(-d^2 / sigma^2) from its centre
    x, y = 13.3 / 4, 27.9 / 4
    cx, cy = int(x), int(y)
    d2 = (cx + 0.5 - x) ** 2 + (cy + 0.5 - y) ** 2
    assert heat[cy, cx, NECK] == pytest.approx(np.exp(-d2 / 1.5 ** 2), rel=1e-5)
    for j in range(J):
        for kp in people:
            if kp[j, 2] > VIS_UNLABELLED:
                u, v = (kp[j, :2] / 4).astype(int)
                window = heat[max(v - 1, 0):v + 2, max(u - 1, 0):u + 2, j]
                assert heat[v, u, j] == window.max() >= np.exp(-0.5 / 1.5 ** 2)   # the peak is there
    # the unlabelled head of person 1 writes nothing: the head map is person 0's Gaussian alone
    alone = _encode(people[None, :1], cfg)["heatmaps"][0]
    np.testing.assert_array_equal(heat[..., HEAD], alone[..., HEAD])
    # a person with no labelled joint writes nothing at all
    empty = people.copy()
    empty[..., 2] = VIS_UNLABELLED
    assert not _encode(empty[None], cfg)["heatmaps"].any()
    # snapping on the targets themselves recovers the exact joints (the log-parabola apex)
    dec = spr.decode(t["root"], t["disp"], SK, cfg.spr, t["heatmaps"])
    poses = dec.poses.numpy()[0, :int(dec.num_people[0])]
    for kp in people:
        lab = kp[:, 2] > VIS_UNLABELLED
        assert min(np.abs(p[lab] - kp[lab, :2]).max() for p in poses) < 1e-3


def test_ignore_regions_leave_the_heatmap_background_out_but_not_the_joints():
    cfg = _cfg()
    rng = np.random.default_rng(1)
    person = _person(rng, np.array([32.0, 32.0]), size=8.0)
    ignore = np.ones((1, 16, 16), bool)
    t = _encode(person[None, None], cfg, ignore=ignore)
    weight, heat = t["heatmap_weight"][0], t["heatmaps"][0]
    np.testing.assert_array_equal(weight > 0, heat > 0)


def test_joint_loss_is_the_configured_confidence_loss_and_adds_to_the_total():
    cfg = _cfg()
    rng = np.random.default_rng(2)
    t = _encode(_person(rng, np.array([32.0, 32.0]))[None, None], cfg)
    t = {k: np.repeat(v, 2, axis=0) for k, v in t.items()}
    out = {"root": t["root"] * 0.5, "disp": t["disp"], "heatmaps": np.full_like(t["heatmaps"], 0.25)}
    want_l2 = ((0.25 - t["heatmaps"]) ** 2).sum() / 2
    got = spm_loss(t, out, cfg.loss, 2)
    assert float(got["joints"]) == pytest.approx(want_l2, rel=1e-5)
    assert float(got["total"]) == pytest.approx(float(got["root"]) + 1.0 * float(got["disp"]) + want_l2, rel=1e-5)
    focal = spm_loss(t, out, dataclasses.replace(cfg.loss, joint_loss="focal", joint_loss_weight=0.5), 2)
    assert float(focal["joints"]) != pytest.approx(want_l2, rel=1e-2)
    assert float(focal["total"]) == pytest.approx(float(focal["root"]) + float(focal["disp"])
                                                  + 0.5 * float(focal["joints"]), rel=1e-5)
    with pytest.raises(ValueError, match="heatmaps"):
        spm_loss({k: v for k, v in t.items() if not k.startswith("heatmap")}, out, cfg.loss, 2)


def _one_person_maps(cfg, rng):
    person = _person(rng, np.array([32.0, 32.0]), size=14.0)
    t = _encode(person[None, None], cfg)
    return person, t


def test_a_regressed_joint_next_to_a_heatmap_peak_moves_onto_it_and_a_far_one_stays():
    cfg = _cfg(anchor="root")        # one reading stage: every joint read at the root
    rng = np.random.default_rng(3)
    person, t = _one_person_maps(cfg, rng)
    moved = person.copy()
    near = np.array([1.3, -0.9]) * 4          # 1.6 cells from the regressed joint: within 2
    far = np.array([4.0, 3.0]) * 4            # 5 cells away: beyond the radius
    moved[NECK, :2] += near
    moved[HEAD, :2] += far
    heat = _encode(moved[None, None], cfg)["heatmaps"]
    dec = spr.decode(t["root"], t["disp"], SK, cfg.spr, heat)
    plain = spr.decode(t["root"], t["disp"], SK, cfg.spr)
    pose, regressed = dec.poses.numpy()[0, 0], plain.poses.numpy()[0, 0]
    np.testing.assert_allclose(regressed, person[:, :2], atol=1e-3)            # the displacements
    np.testing.assert_allclose(pose[NECK], moved[NECK, :2], atol=1e-3)          # snapped, sub-pixel
    np.testing.assert_allclose(pose[HEAD], person[HEAD, :2], atol=1e-3)         # too far: stays
    # a weak peak (below snap_threshold) does not pull the joint either
    weak = heat * 0.05
    pose_weak = spr.decode(t["root"], t["disp"], SK, cfg.spr, weak).poses.numpy()[0, 0]
    np.testing.assert_allclose(pose_weak[NECK], person[NECK, :2], atol=1e-3)
    # snap_radius 0 switches snapping off
    off = spr.decode(t["root"], t["disp"], SK, dataclasses.replace(cfg.spr, snap_radius=0.0), heat)
    np.testing.assert_allclose(off.poses.numpy()[0, 0], person[:, :2], atol=1e-3)


def test_children_are_read_at_their_snapped_parent_and_the_score_uses_the_heatmaps():
    """Hierarchical reading: a child is read at its parent's *snapped* position."""
    cfg = _cfg(anchor="parent")
    rng = np.random.default_rng(4)
    person, t = _one_person_maps(cfg, rng)
    dec = spr.decode(t["root"], t["disp"], SK, cfg.spr, t["heatmaps"])
    np.testing.assert_allclose(dec.poses.numpy()[0, 0], person[:, :2], atol=1e-3)
    root_score = float(spr.decode(t["root"], t["disp"], SK, cfg.spr).scores[0, 0])
    # every joint sits on its peak: the score is sqrt(root * mean heat at the joints)
    values = [t["heatmaps"][0, int(y / 4), int(x / 4), j] for j, (x, y) in enumerate(person[:, :2])]
    assert float(dec.scores[0, 0]) == pytest.approx(np.sqrt(root_score * np.mean(values)), rel=1e-4)
    # no heatmap support at all: the score drops to 0
    none = spr.decode(t["root"], t["disp"], SK, cfg.spr, np.zeros_like(t["heatmaps"]))
    assert float(none.scores[0, 0]) == 0.0 and int(none.num_people[0]) == 1


def test_decoding_with_heatmaps_survives_wild_regressions():
    """An untrained network regresses joints 1e30 px away: no crash, nothing snaps there."""
    cfg = _cfg()
    rng = np.random.default_rng(5)
    _, t = _one_person_maps(cfg, rng)
    disp = t["disp"] * 0 + 1e30
    dec = spr.decode(t["root"], disp, SK, cfg.spr, t["heatmaps"])
    assert int(dec.num_people[0]) == 1 and np.all(np.abs(dec.poses.numpy()[0, 0]) > 1e20)
    nan = spr.decode(t["root"], t["disp"] * np.nan, SK, cfg.spr, t["heatmaps"])
    assert int(nan.num_people[0]) == 1 and np.isnan(nan.poses.numpy()[0, 0]).all()
    plain = spr.decode(t["root"], t["disp"] * np.nan, SK, cfg.spr)       # the plain decoder too
    assert int(plain.num_people[0]) == 1 and np.isnan(plain.poses.numpy()[0, 0]).all()


def test_training_pipeline_heatmaps_flip_with_the_picture(tmp_path_factory):
    """The same image through the training path with flip_prob 1 and 0 (no other geometry):
    the flipped heatmaps are the mirrored plain ones with left and right channels swapped."""
    from dataset import synthetic
    from dataset.ai_challenger import read_ai_challenger
    from dataset.pipeline import InputPipeline, render_targets

    root = tmp_path_factory.mktemp("synthetic_flip")
    paths = synthetic.generate_synthetic_dataset(str(root), 4, 1, seed=6, workers=1)
    records, _ = read_ai_challenger(paths.train_json, paths.train_images)
    maps = {}
    for prob in (0.0, 1.0):
        cfg = _cfg(rotation_deg=0.0, scale_min=1.0, scale_max=1.0, translate_frac=0.0, flip_prob=prob,
                   batch_size=4, deterministic=True, seed=3)
        images, labels = next(iter(InputPipeline(cfg, "train", records).dataset()))
        maps[prob] = (images.numpy(), render_targets(labels, cfg)["heatmaps"].numpy())
    (plain_img, plain), (flip_img, flipped) = maps[0.0], maps[1.0]
    assert plain.max() > 0.9
    # each picture is the mirror of the plain one (letterbox centred: the padding mirrors too)
    for b in range(4):
        mirrored = plain_img[b, :, ::-1]
        assert np.mean(np.abs(flip_img[b].astype(int) - mirrored)) < 2.0
    np.testing.assert_allclose(flipped, spr.flip_heatmaps(plain, SK), atol=2e-3)
    assert np.abs(flipped - plain).max() > 0.5              # flipping changed the maps


@pytest.fixture(scope="module")
def heatmaps_export(tmp_path_factory):
    """A tiny run with the preset's three heads (random output layers, snapping on every joint)
    and ``tools/export.py --flip --onnx`` of it, once for the tests below: the SavedModel (flip
    inside), spm.tflite and spm.onnx."""
    from training_helpers import random_head_run, run_tool
    from utils import predict

    base = tmp_path_factory.mktemp("heatmaps_export")
    run_dir = str(base / "run")
    random_head_run(run_dir, joint_heatmaps=True, score_threshold=0.0, max_people=6, nms_window=3,
                    snap_radius=3.0, snap_threshold=0.0)
    r = run_tool("export", "--ckpt", run_dir, "--out", base / "exported", "--flip", "--onnx")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(base / "exported")) == ["saved_model", "spm.onnx", "spm.onnx.json", "spm.tflite",
                                                     "spm.tflite.json"]
    model, cfg = predict.load_trained_model(run_dir)
    assert "heatmaps" in model.output
    return model, cfg, base / "exported"


def test_exported_model_gives_the_refined_poses_of_the_python_path(heatmaps_export):
    from utils import export, predict

    model, cfg, exported = heatmaps_export
    images = np.random.default_rng(7).integers(0, 255, size=(2, 64, 64, 3), dtype=np.uint8)
    want = predict.predict_images(predict.Predictor(model, cfg, flip=True), list(images))
    plain_cfg = dataclasses.replace(cfg, spr=dataclasses.replace(cfg.spr, snap_radius=0.0))
    unsnapped = predict.predict_images(predict.Predictor(model, plain_cfg, flip=True), list(images))
    serve = tf.saved_model.load(str(exported / "saved_model")).signatures[export.IMAGES_SIGNATURE]
    got = {k: v.numpy() for k, v in serve(images=tf.constant(images)).items()}
    moved = 0.0
    for b in range(2):
        n = int(got["num_people"][b])
        assert n == len(want[b].poses) > 0
        for pose in want[b].poses:
            err = np.abs(got["poses"][b, :n] - pose).reshape(n, -1).max(axis=1)
            assert err.min() < 2e-2
        np.testing.assert_allclose(np.sort(got["scores"][b, :n]), np.sort(want[b].scores), atol=1e-4)
        moved = max(moved, np.abs(want[b].poses - unsnapped[b].poses[:len(want[b].poses)]).max())
    assert moved > 0.5                  # the refinement did move joints: the test compares it


def test_tflite_and_onnx_with_heatmaps_match_the_python_path(heatmaps_export):
    """The command line's spm.tflite (LiteRT) gives the Python path's refined poses; spm.onnx
    (onnxruntime) gives the network's three maps and the poses nets.spr.decode finds in them."""
    from utils import export, predict

    model, cfg, exported = heatmaps_export
    path = str(exported / "spm.tflite")
    meta = json.load(open(path + ".json"))
    assert meta["decoder_inside"], meta.get("decoder_error")
    interp = export.tflite_interpreter(path)
    assert type(interp).__module__.startswith("ai_edge_litert")          # LiteRT, not tf.lite
    image = np.random.default_rng(8).integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    interp.set_tensor(interp.get_input_details()[0]["index"], image[None].astype(np.float32))
    interp.invoke()
    outs = [interp.get_tensor(d["index"]) for d in interp.get_output_details()]
    poses = next(v for v in outs if v.ndim == 4 and v.shape[-1] == 2)[0]
    want, = predict.predict_images(predict.Predictor(model, cfg), [image])
    assert len(want.poses) > 0
    for pose in want.poses:
        # LiteRT's kernels move a snapped joint by up to 0.023 px here (TF's interpreter: 1e-4)
        assert np.abs(poses[:len(want.poses)] - pose).reshape(len(want.poses), -1).max(axis=1).min() < 5e-2
    # The ONNX file of the same model. Its maps equal the network's to 1e-4, but on this random
    # head a 1e-5 change of the maps moves peaks (snap threshold 0, flat maps; measured: a joint
    # 4.6 px away from the Python path's), so its decoder is checked on its own maps: the poses
    # it returns are nets.spr.decode's of the maps it returns.
    import onnxruntime
    from nets.spr import decode

    assert json.load(open(exported / "spm.onnx.json"))["decoder_inside"]
    session = onnxruntime.InferenceSession(str(exported / "spm.onnx"))
    assert [i.name for i in session.get_inputs()] == ["images"]
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": image[None].astype(np.float32)})))
    net = model(image[None].astype(np.float32), training=False)
    for k in ("root", "disp", "heatmaps"):
        np.testing.assert_allclose(got[k], np.asarray(net[k], np.float32), atol=1e-4)
    dec = decode(got["root"], got["disp"], cfg.skeleton, cfg.spr, got["heatmaps"])
    n = int(dec.num_people[0])
    assert int(got["num_people"][0]) == n > 0
    np.testing.assert_allclose(got["poses"][0, :n], dec.poses[0, :n].numpy(), atol=1e-3)
    np.testing.assert_allclose(got["scores"][0, :n], dec.scores[0, :n].numpy(), atol=1e-6)
