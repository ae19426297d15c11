"""State_dict <-> Keras mapping, the checkpoint converter and the trunk weight file."""

import os
import tempfile

import keras
import numpy as np
import pytest

from config.config import ModelConfig, get_preset
from nets.hrnet import backbone_spec, branch_outputs, build_hrnet, iter_layers
from nets.spm_model import build_spm_model, get_backbone, load_backbone_weights
from nets.weights import (convert_checkpoint, keras_to_state_dict, load_layer_weights,
                          load_state_dict, normalize_state_dict, read_state_dict,
                          save_layer_weights)
from training_helpers import load_tool

SIZE = 64


def _randomise(model, seed=0):
    """Random kernels, BN affine parameters and BN running statistics."""
    rng = np.random.default_rng(seed)
    for layer in iter_layers(model):
        for v in layer.weights:
            shape = tuple(v.shape)
            if v.name == "kernel":
                value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
            elif v.name in ("gamma", "moving_variance"):
                value = rng.uniform(0.5, 2.0, shape)
            else:
                value = rng.normal(0, 0.2, shape)
            v.assign(value.astype(np.float32))
    return model


@pytest.fixture(scope="module")
def spec():
    return backbone_spec(ModelConfig(backbone="hrnet_tiny"))


@pytest.fixture(scope="module")
def source_trunk(spec):
    return _randomise(build_hrnet(spec, (SIZE, SIZE, 3)))


@pytest.fixture(scope="module")
def official_npz(tmp_path_factory, spec, source_trunk):
    """The random trunk as an official-layout pose checkpoint (with its final_layer)."""
    sd = keras_to_state_dict(source_trunk)
    sd["final_layer.weight"] = np.zeros((17, spec.width, 1, 1), np.float32)
    sd["final_layer.bias"] = np.zeros((17,), np.float32)
    path = str(tmp_path_factory.mktemp("ckpt") / "pose_hrnet_tiny.npz")
    np.savez(path, **sd)
    return path, sd


def test_export_uses_oihw_and_pytorch_names(source_trunk):
    sd = keras_to_state_dict(source_trunk)
    conv1 = source_trunk.get_layer("conv1")
    np.testing.assert_array_equal(sd["conv1.weight"][5, 2, 0, 1], np.asarray(conv1.kernel)[0, 1, 2, 5])
    bn = source_trunk.get_layer("bn1")
    np.testing.assert_array_equal(sd["bn1.running_var"], np.asarray(bn.moving_variance))
    np.testing.assert_array_equal(sd["bn1.weight"], np.asarray(bn.gamma))
    assert sd["bn1.num_batches_tracked"].dtype == np.int64


def test_round_trip_through_official_layout(tmp_path, spec, source_trunk, official_npz):
    npz_path, _ = official_npz
    out = str(tmp_path / "backbone.weights.h5")
    result = convert_checkpoint(npz_path, out, spec, source="pose")
    assert result["ignored"] == ["final_layer.bias", "final_layer.weight"]
    fresh = build_hrnet(spec, (SIZE, SIZE, 3))
    load_layer_weights(fresh, out)
    x = np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    expected = np.asarray(branch_outputs(source_trunk, x, training=False)[0])
    got = np.asarray(branch_outputs(fresh, x, training=False)[0])
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_backbone_file_loads_into_spm_model(tmp_path, spec, source_trunk, official_npz):
    out = str(tmp_path / "backbone.weights.h5")
    convert_checkpoint(official_npz[0], out, spec, source="pose")
    cfg = get_preset("tiny_synthetic").replace(input_height=SIZE, input_width=SIZE,
                                               backbone_weights=out)
    model = build_spm_model(cfg)
    trunk = get_backbone(model)
    # building never reads the file (a trained run must load without it); the trainer loads it
    assert not np.array_equal(np.asarray(trunk.get_layer("conv1").kernel),
                              np.asarray(source_trunk.get_layer("conv1").kernel))
    load_backbone_weights(model, cfg.model.backbone_weights)
    for name in ("conv1", "stage3.1.fuse_layers.0.2.0"):
        np.testing.assert_array_equal(np.asarray(trunk.get_layer(name).kernel),
                                      np.asarray(source_trunk.get_layer(name).kernel))
    np.testing.assert_array_equal(np.asarray(trunk.get_layer("bn2").moving_mean),
                                  np.asarray(source_trunk.get_layer("bn2").moving_mean))


def test_wrong_weight_file_is_refused(tmp_path):
    path = str(tmp_path / "w8.weights.h5")
    save_layer_weights(build_hrnet(backbone_spec(ModelConfig(backbone="hrnet_tiny", tiny_width=8))), path)
    model = build_spm_model(get_preset("tiny_synthetic").replace(input_height=SIZE, input_width=SIZE))
    with pytest.raises(ValueError, match=r"w8\.weights\.h5.*wrong shape.*stage2\.0\.branches\.0\.0\.conv1/kernel"):
        load_backbone_weights(model, path)
    with pytest.raises(FileNotFoundError, match="missing.weights.h5"):
        load_backbone_weights(model, str(tmp_path / "missing.weights.h5"))


def test_damaged_state_dicts_are_refused(spec, official_npz):
    _, sd = official_npz
    trunk = build_hrnet(spec)

    missing = dict(sd)
    del missing["stage2.0.fuse_layers.1.0.0.1.running_var"]
    with pytest.raises(ValueError, match=r"1 missing keys: stage2\.0\.fuse_layers\.1\.0\.0\.1\.running_var"):
        load_state_dict(trunk, missing, ("final_layer.",))

    extra = dict(sd, **{"stage2.0.branches.0.7.conv1.weight": np.zeros((16, 16, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"1 unexpected keys: stage2\.0\.branches\.0\.7\.conv1\.weight"):
        load_state_dict(trunk, extra, ("final_layer.",))

    wrong = dict(sd, **{"layer1.0.conv2.weight": np.zeros((16, 16, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"layer1\.0\.conv2\.weight \(got \(16, 16, 1, 1\), "
                                         r"expected \(16, 16, 3, 3\)\)"):
        load_state_dict(trunk, wrong, ("final_layer.",))

    # The final layer is only ignorable when declared so.
    with pytest.raises(ValueError, match=r"unexpected keys: final_layer\.bias, final_layer\.weight"):
        load_state_dict(trunk, sd)


def test_nothing_is_assigned_when_refused(spec, official_npz):
    _, sd = official_npz
    trunk = build_hrnet(spec)
    before = np.asarray(trunk.get_layer("conv1").kernel).copy()
    damaged = dict(sd)
    del damaged["bn1.weight"]
    with pytest.raises(ValueError):
        load_state_dict(trunk, damaged, ("final_layer.",))
    np.testing.assert_array_equal(np.asarray(trunk.get_layer("conv1").kernel), before)


def test_wrapped_and_prefixed_state_dicts_are_normalised():
    sd = {"state_dict": {"module.conv1.weight": np.ones((2, 3, 3, 3)),
                         "module.bn1.num_batches_tracked": np.array(5)}}
    assert list(normalize_state_dict(sd)) == ["conv1.weight"]


def test_imagenet_checkpoint_feeds_single_and_multi_scale_trunks(tmp_path, spec, capsys):
    multi = _randomise(build_hrnet(spec, multi_scale_output=True), seed=3)
    sd = keras_to_state_dict(multi)
    sd["incre_modules.0.0.conv1.weight"] = np.zeros((32, 16, 1, 1), np.float32)
    sd["classifier.weight"] = np.zeros((1000, 2048), np.float32)
    path = str(tmp_path / "imagenet.npz")
    np.savez(path, **sd)
    out_multi = str(tmp_path / "multi.weights.h5")
    out_single = str(tmp_path / "single.weights.h5")
    assert len(convert_checkpoint(path, out_multi, spec, "imagenet", multi_scale_output=True)["ignored"]) == 2
    ignored = convert_checkpoint(path, out_single, spec, "imagenet")["ignored"]
    last = spec.stages[-1].num_modules - 1
    assert any(k.startswith(f"stage4.{last}.fuse_layers.3.") for k in ignored)
    assert not any(k.startswith(f"stage4.{last}.fuse_layers.0.") for k in ignored)
    # the same through the command line (--source imagenet --multi-scale): the written file
    # fills a multi-scale trunk with the checkpoint's values
    tool = load_tool("convert_hrnet_weights")
    out_cli = str(tmp_path / "cli.weights.h5")
    assert tool.main(["--input", path, "--output", out_cli, "--arch", "hrnet_tiny", "--source", "imagenet",
                      "--multi-scale"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == f"wrote {out_cli}: {len(multi.weights)} tensors, 2 ignored keys of the official heads"
    filled = build_hrnet(spec, multi_scale_output=True)
    load_layer_weights(filled, out_cli)
    for a, b in zip(filled.weights, multi.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A pose checkpoint (fuses into branch 0 only) cannot fill the multi-scale trunk.
    pose = {k: v for k, v in sd.items() if not k.startswith(f"stage4.{last}.fuse_layers.1.")}
    pose_path = str(tmp_path / "pose.npz")
    np.savez(pose_path, **pose)
    with pytest.raises(ValueError, match="ImageNet checkpoint"):
        convert_checkpoint(pose_path, str(tmp_path / "x.weights.h5"), spec, "pose",
                           multi_scale_output=True)


def test_unreadable_inputs_name_the_file(tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_text("x")
    with pytest.raises(ValueError, match="model.ckpt.*expected .pth or .npz"):
        read_state_dict(str(bad))
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        read_state_dict(str(tmp_path / "nope.npz"))


def test_converter_tool_exits_with_one_clear_line(tmp_path, capsys, official_npz):
    tool = load_tool("convert_hrnet_weights")
    code = tool.main(["--input", official_npz[0], "--output", str(tmp_path / "w32.weights.h5"),
                      "--arch", "hrnet_w32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert official_npz[0] in err[0] and "wrong shape" in err[0] and "hrnet_w32" in err[0]
    assert not os.path.exists(tmp_path / "w32.weights.h5")


class Payload:
    """Stands for any non-tensor object a downloaded checkpoint might carry."""

    def __reduce__(self):
        import os
        return os.system, ("touch " + MARKER,)


class Plain:
    """A plain object of a class of its own (no code in its pickle, but not a tensor)."""


# one marker per test process: concurrent runs of the suite do not see each other's
MARKER = os.path.join(tempfile.gettempdir(), f"spm_test_unpickled_marker_{os.getpid()}")


def _pth(tmp_path, obj, name="evil.pth"):
    """A .pth in PyTorch's zip layout (``archive/data.pkl``) holding ``obj`` pickled."""
    import pickle
    import zipfile

    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        z.writestr("archive/version", "3\n")
    return str(path)


@pytest.mark.parametrize("obj, named", [(Payload(), "posix.system"),
                                        ({"w": Plain()}, "test_weights.Plain")])
def test_pth_with_a_pickled_non_tensor_object_is_refused_unrun(tmp_path, obj, named):
    import os
    from nets.weights import read_state_dict

    if os.path.exists(MARKER):
        os.remove(MARKER)
    path = _pth(tmp_path, obj)
    with pytest.raises(ValueError, match=rf"evil\.pth:archive/data\.pkl: refused: .*{named}"):
        read_state_dict(path)
    assert not os.path.exists(MARKER)                  # nothing of the pickle ran


def test_pth_of_plain_containers_passes_the_check_and_needs_torch(tmp_path):
    import collections
    import importlib.util
    from nets.weights import read_state_dict

    path = _pth(tmp_path, collections.OrderedDict(conv1=[1.0, 2.0]), "ok.pth")
    if importlib.util.find_spec("torch") is None:
        with pytest.raises(ValueError, match=r"ok\.pth: reading a PyTorch checkpoint needs the torch package"):
            read_state_dict(path)
    else:
        with pytest.raises(ValueError, match="weights_only"):   # lists are not tensors
            read_state_dict(path)
