import argparse
import json

import pytest

from config import (AI_CHALLENGER, COCO, PRESETS, ROOT, Config, add_config_args, config_from_args,
                    get_preset, get_skeleton, joint_mapping, load_config, parse_config)


def test_presets_resolve_and_differ():
    assert {"tiny_synthetic", "ai_challenger_w32_512", "coco_w32_512"} <= set(PRESETS)
    aic = get_preset("ai_challenger_w32_512")
    coco = get_preset("coco_w32_512")
    tiny = get_preset("tiny_synthetic")
    assert (aic.data.input_height, aic.data.input_width) == (512, 512)
    assert aic.model.backbone == coco.model.backbone == "hrnet_w32"
    assert aic.skeleton.num_joints == 14 and coco.skeleton.num_joints == 17
    assert tiny.model.backbone == "hrnet_tiny" and tiny.data.dataset == "synthetic"
    assert aic.output_shape == (128, 128)


def test_every_field_overrides_from_command_line():
    cfg, _ = parse_config(["--preset", "coco_w32_512", "--batch-size", "3", "--lr", "5e-4",
                           "--lr-decay-epochs", "4,9", "--no-augment", "--anchor", "root",
                           "--mixed-precision", "bfloat16", "--xla"])
    assert cfg.preset == "coco_w32_512"
    assert cfg.data.batch_size == 3 and cfg.train.lr == 5e-4
    assert cfg.train.lr_decay_epochs == (4, 9)
    assert cfg.augment.augment is False and cfg.spr.anchor == "root"
    assert cfg.train.mixed_precision == "bfloat16" and cfg.train.xla is True
    # fields not given keep the preset's values
    assert cfg.data.skeleton == "coco"
    # one flag per leaf field, but for the fields the program writes (a derived skeleton)
    from config.config import NOT_FLAGS

    parser = add_config_args(argparse.ArgumentParser())
    flags = {a.dest for a in parser._actions if a.dest.startswith("cfg__")}
    leaves = {k for section in Config().to_dict().values() if isinstance(section, dict) for k in section}
    assert NOT_FLAGS == {"skeleton_spec"} and flags == {"cfg__" + k for k in leaves - NOT_FLAGS}


@pytest.mark.parametrize("argv, message", [
    (["--anchor", "elbow"], "anchor"),
    (["--input-height", "500"], "input_height"),
    (["--batch-size", "0"], "batch_size"),
    (["--batch-size", "2.5"], "batch_size"),
    (["--scale-min", "2"], "scale_min"),
])
def test_bad_overrides_name_the_field(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(argv)


def test_config_round_trips_through_run_dir(tmp_path):
    cfg, _ = parse_config(["--preset", "ai_challenger_w32_512", "--tau", "5", "--lr-decay-epochs", "2"])
    path = cfg.save(str(tmp_path))
    assert json.load(open(path))["spr"]["tau"] == 5.0
    again = load_config(str(tmp_path))
    assert again == cfg
    # --config starts from the saved run, flags still override it
    parser = add_config_args(argparse.ArgumentParser())
    cfg2 = config_from_args(parser.parse_args(["--config", str(tmp_path), "--sigma", "3"]))
    assert cfg2.spr.tau == 5.0 and cfg2.spr.sigma == 3.0


def test_load_config_rejects_bad_files(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_config(str(tmp_path))
    bad.write_text(json.dumps({"model": {"no_such_field": 1}}))
    with pytest.raises(ValueError, match="no_such_field"):
        load_config(str(bad))
    with pytest.raises(FileNotFoundError, match="no such config"):
        load_config(str(tmp_path / "missing"))


def test_ai_challenger_skeleton_matches_design():
    s = AI_CHALLENGER
    assert s.num_joints == 14
    name = s.joint_names
    root_children = {name[j] for j in s.children(ROOT)}
    assert root_children == {"neck", "right_shoulder", "left_shoulder", "right_hip", "left_hip"}
    assert name[s.parents[s.index("head_top")]] == "neck"
    assert [name[j] for j in (s.parents[s.index("right_wrist")], s.parents[s.index("right_elbow")])] \
        == ["right_elbow", "right_shoulder"]
    # levels by degrees of freedom: 1 neck/shoulders/hips, 2 head/elbows/knees, 3 wrists/ankles
    by_level = {lvl: {name[j] for j, l in enumerate(s.levels) if l == lvl} for lvl in (1, 2, 3)}
    assert by_level[2] == {"head_top", "right_elbow", "left_elbow", "right_knee", "left_knee"}
    assert by_level[3] == {"right_wrist", "left_wrist", "right_ankle", "left_ankle"}
    assert set(s.flip_pairs) == {(0, 3), (1, 4), (2, 5), (6, 9), (7, 10), (8, 11)}
    # parents always come before children in the topological order
    pos = {j: i for i, j in enumerate(s.topological_order)}
    assert all(pos[p] < pos[j] for p, j in s.limbs)


def test_coco_skeleton_and_flip_permutation():
    s = COCO
    assert s.num_joints == 17 and s.num_levels == 3
    assert {s.joint_names[j] for j in s.children(ROOT)} == {
        "nose", "left_shoulder", "right_shoulder", "left_hip", "right_hip"}
    for skel in (AI_CHALLENGER, COCO):
        perm = skel.flip_index
        assert sorted(perm) == list(range(skel.num_joints))
        assert all(perm[perm[j]] == j for j in range(skel.num_joints))
        for j, k in enumerate(perm):
            a, b = skel.joint_names[j], skel.joint_names[k]
            assert a.replace("left", "right") == b or a.replace("right", "left") == b


def test_joint_mapping_is_by_name():
    pairs = joint_mapping(AI_CHALLENGER, COCO)
    assert len(pairs) == 12
    assert all(AI_CHALLENGER.joint_names[a] == COCO.joint_names[b] for a, b in pairs)
    with pytest.raises(ValueError, match="unknown skeleton"):
        get_skeleton("mpii")
