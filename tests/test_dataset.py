"""The tf.data pipeline: what comes out decodes to the augmented people, bad images are skipped
and counted, evaluation batches carry their letterbox, determinism, sharding, ignore regions."""

import dataclasses

import cv2
import numpy as np
import pytest
import tensorflow as tf

from config import get_preset
from dataset import synthetic
from dataset.ai_challenger import read_ai_challenger
from dataset.augment import apply_colour
from dataset.pipeline import InputPipeline, load_records, on_device, render_targets
from config.skeletons import VIS_UNLABELLED
from dataset.letterbox import letterbox_image, letterbox_params, to_network
from nets.spr import decode

SIZE = 128      # network input; output maps 32 x 32


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    paths = synthetic.generate_synthetic_dataset(str(root), 8, 2, seed=4, workers=1)
    recs, _ = read_ai_challenger(paths.train_json, paths.train_images)
    return recs


def _cfg(**overrides):
    base = dict(input_height=SIZE, input_width=SIZE, batch_size=2, deterministic=True, seed=1)
    return get_preset("tiny_synthetic").replace(**{**base, **overrides})


def _decoded_error(targets, keypoints, cfg):
    """Largest distance (px) between each labelled joint and its person's decoded joint."""
    poses, _, num, _ = decode(tf.constant(targets["root"][None]), tf.constant(targets["disp"][None]),
                              cfg.skeleton, cfg.spr)
    poses = poses.numpy()[0, :int(num[0])]
    labelled = keypoints[..., 2] > VIS_UNLABELLED
    worst = 0.0
    for kp, lab in zip(keypoints, labelled):
        if not lab.any():
            continue
        best = min(np.abs(p[lab] - kp[lab, :2]).max() for p in poses)
        worst = max(worst, best)
    return worst, len(poses), int(labelled.any(axis=1).sum())


def test_pipeline_output_decodes_to_the_augmented_keypoints(records):
    cfg = _cfg()
    pipe = InputPipeline(cfg, "train", records)
    assert pipe.augmenter is not None
    pairs = list(pipe.element_indices_and_seeds().take(8).as_numpy_iterator())
    batches = list(pipe.dataset().take(4))
    flips, colours = [], []
    for k, (images, labels) in enumerate(batches):
        # the host ships uint8 pictures and a few KB of points; the step colours and renders
        assert images.dtype == tf.uint8 and images.shape == (2, SIZE, SIZE, 3)
        assert set(labels) == {"keypoints", "boxes", "ignore", "colour"}
        indices = [int(i) for i, _ in pairs[2 * k:2 * k + 2]]
        samples = pipe.samples(indices, int(pairs[2 * k][1]))   # the same batch in plain Python
        coloured, targets = on_device(images, labels, cfg)   # TF encoder == NumPy reference
        for b, sample in enumerate(samples):
            np.testing.assert_array_equal(images[b].numpy(), sample.image)
            np.testing.assert_array_equal(labels["colour"][b].numpy(), sample.colour)
            np.testing.assert_allclose(coloured[b].numpy(), apply_colour(sample.image[None], sample.colour[None])[0],
                                       atol=1e-4)
            got = {key: v[b].numpy() for key, v in targets.items()}
            # the NumPy reference encodes root and displacements; the joint heatmaps (the
            # preset's --joint-heatmaps) exist on the device only: their peaks are checked here
            assert set(got) == set(sample.targets) | {"heatmaps", "heatmap_weight"}
            for key in sample.targets:
                np.testing.assert_allclose(got[key], sample.targets[key], rtol=0, atol=1e-6)
            for kp in sample.keypoints:
                for j, (x, y, v) in enumerate(kp):
                    if v > VIS_UNLABELLED and 0 <= x < SIZE and 0 <= y < SIZE:
                        assert got["heatmaps"][int(y // 4), int(x // 4), j] >= np.exp(-0.5 / cfg.spr.joint_sigma ** 2) - 1e-6
            error, found, people = _decoded_error(got, sample.keypoints, cfg)
            assert found == people and error < 0.01
            flips.append(sample.flipped)
            colours.append(sample.colour)
            # the augmentation really moved the people away from the plain letterbox
            lb = sample.letterbox
            plain = to_network(records[indices[b]].keypoints[..., :2], lb)
            assert not np.allclose(plain, sample.keypoints[..., :2], atol=1.0)
    assert set(flips) == {True, False}                     # mirrored and plain samples both decode
    multipliers = np.array(colours)[:, 0]
    assert multipliers.min() >= 0.8 and multipliers.max() <= 1.2 and multipliers.std() > 0.01


def test_validation_does_not_augment(records):
    cfg = _cfg()
    pipe = InputPipeline(cfg, "val", records)
    assert pipe.augmenter is None
    for seed in (0, 99):
        s = pipe.sample(2, seed)
        r = records[2]
        bgr = cv2.imread(r.image_path)
        lb = letterbox_params(bgr.shape[0], bgr.shape[1], SIZE, SIZE)
        np.testing.assert_array_equal(s.image, letterbox_image(bgr, lb)[..., ::-1])
        lab = r.keypoints[..., 2] > VIS_UNLABELLED
        np.testing.assert_array_equal(s.keypoints[..., 2], r.keypoints[..., 2])
        np.testing.assert_allclose(s.keypoints[lab, :2], to_network(r.keypoints[lab, :2], lb), atol=1e-4)
        assert np.all(s.keypoints[~lab, :2] == 0)
        error, found, people = _decoded_error(s.targets, s.keypoints, cfg)
        assert found == people and error < 0.01


def test_corrupt_and_missing_images_are_skipped_and_counted(records, tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    recs = records[:3] + [dataclasses.replace(records[3], image_path=str(bad)),
                          dataclasses.replace(records[4], image_path=str(tmp_path / "missing.jpg"))]
    pipe = InputPipeline(_cfg(batch_size=1, augment=False), "train", recs)
    good = []
    for r in records[:3]:
        bgr = cv2.imread(r.image_path)
        good.append(letterbox_image(bgr, letterbox_params(*bgr.shape[:2], SIZE, SIZE))[..., ::-1])
    for epoch in (1, 2):
        # an unusable picture is replaced by the next usable record: every batch is full and
        # holds a good picture; record 3 tries 3 (corrupt), 4 (missing), 0; record 4 tries 4, 0
        batches = [images[0].numpy() for images, _ in pipe.dataset()]
        assert len(batches) == 5
        assert all(any(np.array_equal(b, g) for g in good) for b in batches)
        assert pipe.skipped.by_reason == {"corrupt image": epoch, "missing file": 2 * epoch}
    assert len(pipe.skipped.files) == 2
    indices = np.concatenate([info["index"].numpy() for _, info in pipe.eval_dataset(2)])
    assert indices.tolist() == [0, 1, 2]


def test_twenty_unusable_pictures_in_a_row_stop_the_pipeline_naming_the_first(records, tmp_path):
    """One usable picture among 25 records: a record whose 20 successors (itself included) are
    all unusable stops the pipeline with one line naming its file; 19 unusable then the usable
    one is still read. Through ``dataset()``, the error reaches the caller as that line."""
    from dataset.pipeline import MAX_REPLACEMENTS, input_error_message

    assert MAX_REPLACEMENTS == 20
    missing = [dataclasses.replace(records[0], image_path=str(tmp_path / f"missing{i}.jpg")) for i in range(24)]
    pipe = InputPipeline(_cfg(batch_size=1, augment=False), "train", [records[0]] + missing)
    with pytest.raises(ValueError) as e:
        pipe._read_or_replace(5)                 # records 5..24: 20 unusable
    first_missing = str(tmp_path / "missing4.jpg")
    assert str(e.value).startswith(f"20 records in a row from {first_missing!r} have no usable picture")
    assert pipe.skipped.count == 20
    rgb = pipe._read_or_replace(6)[0]            # records 6..24 (19 unusable), then record 0
    assert rgb.shape == cv2.imread(records[0].image_path).shape and pipe.skipped.count == 39
    with pytest.raises(tf.errors.OpError) as e:
        for _ in pipe.dataset():
            pass
    assert input_error_message(e.value).startswith("20 records in a row from ")


def test_eval_batches_carry_index_and_letterbox(records):
    pipe = InputPipeline(_cfg(), "val", records[:5])
    seen = []
    for images, info in pipe.eval_dataset(2):
        for b, index in enumerate(info["index"].numpy()):
            bgr = cv2.imread(records[index].image_path)
            lb = letterbox_params(bgr.shape[0], bgr.shape[1], SIZE, SIZE)
            np.testing.assert_allclose(info["letterbox"][b].numpy(), lb.as_array(), rtol=1e-6)
            assert info["image_hw"][b].numpy().tolist() == list(bgr.shape[:2])
            np.testing.assert_array_equal(images[b].numpy(), letterbox_image(bgr, lb)[..., ::-1])
            # network point -> original: x = (x' - pad_x) / sx
            sx, sy, px, py = info["letterbox"][b].numpy()
            kp = records[index].keypoints[0, 0, :2]
            net = to_network(kp, lb)
            np.testing.assert_allclose(((net[0] - px) / sx, (net[1] - py) / sy), kp, atol=1e-3)
            seen.append(int(index))
    assert seen == [0, 1, 2, 3, 4]


def test_deterministic_mode_repeats_runs_and_varies_epochs(records):
    cfg = _cfg()
    a = next(iter(InputPipeline(cfg, "train", records).dataset()))
    b = next(iter(InputPipeline(cfg, "train", records).dataset()))
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    n = len(records)
    stream = list(InputPipeline(cfg, "train", records).element_indices_and_seeds(repeat=True).take(2 * n)
                  .as_numpy_iterator())
    first, second = stream[:n], stream[n:]
    assert sorted(i for i, _ in first) == sorted(i for i, _ in second) == list(range(n))   # each record once a pass
    assert [i for i, _ in first] != [i for i, _ in second]                                # a new order per pass
    assert len({s for _, s in stream}) == 2 * n                                          # new seeds
    other = list(InputPipeline(_cfg(seed=2), "train", records).element_indices_and_seeds().as_numpy_iterator())
    assert other != first
    # without --deterministic each pipeline draws its own data seed (the training loop keeps its in
    # the checkpoint)
    free = [InputPipeline(_cfg(deterministic=False), "train", records) for _ in range(2)]
    assert free[0].seed != free[1].seed


def test_a_resumed_stream_is_the_rest_of_the_uninterrupted_one(records):
    """The data position: the stream started at global step s (a resume) is the uninterrupted
    stream from element s x G on, on one pipeline and on two (each its replicas' share of every
    global batch); another replica layout with the same global batch holds the same pictures in
    every global step. Nothing is read to get there (the stream is indices only)."""
    pipe = InputPipeline(_cfg(), "train", records)
    G = 4
    full = [tuple(int(v) for v in x) for x in pipe.element_indices_and_seeds(repeat=True, batch_size=G, seed=7)
            .take(12 * G).as_numpy_iterator()]
    resumed = [tuple(int(v) for v in x) for x in pipe.element_indices_and_seeds(
        repeat=True, batch_size=G, seed=7, start_step=5).take(7 * G).as_numpy_iterator()]
    assert resumed == full[5 * G:]

    def shares(start):              # 2 input pipelines x 1 replica each, per-replica batch 2
        out = []
        for k in (0, 1):
            ctx = tf.distribute.InputContext(2, k, 2)
            out.append([tuple(int(v) for v in x) for x in pipe.element_indices_and_seeds(
                ctx, repeat=True, batch_size=2, seed=7, start_step=start).take(2 * (12 - start)).as_numpy_iterator()])
        return out

    for start in (0, 5):
        a, b = shares(start)
        joined = [x for s in range(12 - start) for x in a[2 * s:2 * s + 2] + b[2 * s:2 * s + 2]]
        assert joined == full[start * G:]


def test_batching_and_sharding(records):
    pipe = InputPipeline(_cfg(), "train", records)
    train = [x.shape[0] for x, _ in pipe.dataset(batch_size=3)]
    assert train == [3, 3]                                               # drop_remainder
    images, labels = next(iter(pipe.dataset(batch_size=3)))
    J, P = pipe.skeleton.num_joints, pipe.cfg.data.max_people_per_image
    assert labels["keypoints"].shape == (3, P, J, 3) and labels["boxes"].shape == (3, P, 4)
    assert labels["ignore"].shape == (3, 32, 4) and labels["ignore"].dtype == tf.uint8
    # host bytes per picture: the uint8 image plus the points
    per_image = sum(v.numpy().nbytes for v in (images, *labels.values())) / 3
    assert per_image <= SIZE * SIZE * 3 + 8 * 1024
    targets = render_targets(labels, pipe.cfg)
    assert targets["root"].shape == (3, 32, 32, 1) and targets["root_weight"].shape == (3, 32, 32, 1)
    assert targets["disp"].shape == (3, 32, 32, 2 * J) and targets["disp_weight"].shape == (3, 32, 32, 2 * J)
    val = [x.shape[0] for x, _ in InputPipeline(_cfg(), "val", records).dataset(batch_size=3)]
    assert val == [3, 3, 2]
    shards = [{int(i) for i, _ in pipe.element_indices_and_seeds(
        tf.distribute.InputContext(2, k, 2)).as_numpy_iterator()} for k in (0, 1)]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(len(records)))


def test_ignore_regions_zero_the_root_weight_but_not_at_people(records):
    r = records[0]
    bgr = cv2.imread(r.image_path)
    H, W = bgr.shape[:2]
    half = [[0, 0, W / 2, 0, W / 2, H, 0, H]]                           # left half, COCO polygon
    rec = dataclasses.replace(r, ignore_regions=[half])
    lb = letterbox_params(H, W, SIZE, SIZE)
    # the region in output cells (stride 4): x' in [pad_x, pad_x + sx * W / 2), y' in the picture
    x_end = (lb.pad_x + lb.scale_x * W / 2) / 4
    y0, y1 = lb.pad_y / 4, (lb.pad_y + lb.new_h) / 4
    u = np.arange(32)
    inside = ((u[None, :] >= lb.pad_x / 4) & (u[None, :] + 1 <= x_end) &
              (u[:, None] >= y0) & (u[:, None] + 1 <= y1))
    outside = (u[None, :] >= np.ceil(x_end)) | (u[:, None] + 1 <= np.floor(y0)) | (u[:, None] >= np.ceil(y1))

    t = InputPipeline(_cfg(ignore_crowd=True), "val", [rec]).sample(0).targets
    weight, root = t["root_weight"][..., 0], t["root"][..., 0]
    assert inside.sum() > 50
    assert np.all(weight[inside & (root <= 0)] == 0)
    assert np.all(weight[outside] == 1)
    assert np.all(weight[root > 0] == 1)                                # people keep their peaks
    t_off = InputPipeline(_cfg(ignore_crowd=False), "val", [rec]).sample(0).targets
    assert np.all(t_off["root_weight"] == 1)

    # training: the region warped with the augmentation, shipped as bits, rendered in the graph
    pipe = InputPipeline(_cfg(ignore_crowd=True, batch_size=4), "train", [rec] * 4)
    pairs = list(pipe.element_indices_and_seeds().take(4).as_numpy_iterator())
    _, labels = next(iter(pipe.dataset()))
    rendered = render_targets(labels, pipe.cfg)["root_weight"].numpy()
    zeroed = 0
    samples = pipe.samples([int(i) for i, _ in pairs], int(pairs[0][1]))
    for b, sample in enumerate(samples):
        ref = sample.targets["root_weight"]
        np.testing.assert_array_equal(rendered[b], ref)
        zeroed += int((ref == 0).sum())
    assert zeroed > 100


def test_missing_configuration_is_a_clear_error():
    cfg = get_preset("ai_challenger_w32_512")
    with pytest.raises(ValueError, match="--train-json is not set.*--train-json FILE --train-images DIR"):
        load_records(cfg, "train")


def test_people_beyond_the_slots_are_left_out_with_a_warning(records, caplog):
    """--max-people-per-image 1: a warning at start names the crowded images; each picture ships
    its first labelled person, padding people never take a slot."""
    crowded = [r for r in records if len(r.keypoints) >= 2][:2]
    assert len(crowded) == 2
    with caplog.at_level("WARNING"):
        pipe = InputPipeline(_cfg(max_people_per_image=1, augment=False), "train", crowded)
    assert "2 train images have more than max_people_per_image = 1" in caplog.text
    assert crowded[0].image_id in caplog.text
    _, kps, boxes, _, _ = pipe._train_batch(np.array([0, 1]), np.array([0]))
    samples = pipe.samples([0, 1], 0)
    for b, sample in enumerate(samples):
        first = np.flatnonzero((sample.keypoints[..., 2] > VIS_UNLABELLED).any(axis=1))[0]
        assert kps.shape[1] == 1
        np.testing.assert_array_equal(kps[b, 0], sample.keypoints[first])
        np.testing.assert_array_equal(boxes[b, 0], sample.boxes[first])
