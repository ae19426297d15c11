"""HRNet trunk and SPM model: sizes of the official nets, padding, upsampling, names, heads.

Expected numbers come from outside this code: parameter counts and conv MACs of the official
HRNet-W32/W48 pose nets (deep-high-resolution-net.pytorch model zoo and DESIGN.md), the key
layout of the official state_dict (lib/models/pose_hrnet.py: module paths and OIHW shapes),
and references computed here with NumPy.
"""

import keras
import numpy as np
import pytest

from config.config import ModelConfig, get_preset
from nets.hrnet import (BN_EPSILON, backbone_spec, branch_outputs, build_hrnet, conv_macs,
                        iter_layers, make_spec, trainable_params)
from nets.spm_model import ROOT_PRIOR, build_spm_model, get_backbone
from nets.weights import keras_to_state_dict


@pytest.fixture(scope="module")
def w32_256x192():
    return build_hrnet(make_spec("hrnet_w32", 32), (256, 192, 3))


@pytest.fixture(scope="module")
def tiny():
    return build_hrnet(backbone_spec(ModelConfig(backbone="hrnet_tiny")), (64, 64, 3))


def test_official_parameter_counts(w32_256x192):
    assert trainable_params(w32_256x192) == 28_535_552
    assert trainable_params(build_hrnet(make_spec("hrnet_w48", 48))) == 63_594_912


def test_w32_conv_macs_match_official(w32_256x192):
    trunk = conv_macs(w32_256x192)
    assert abs(trunk - 7.645e9) / 7.645e9 < 1e-3
    # The official 7.645 G includes the final 1x1 heatmap conv (17 COCO joints, no MAC for
    # its bias) at 64x48: trunk + final agrees to the four printed digits.
    final_layer = 64 * 48 * 32 * 17
    assert abs(trunk + final_layer - 7.645e9) < 0.0005e9
    assert abs(trunk - 7.645e9) > 0.0005e9


def test_state_dict_layout_is_official(w32_256x192):
    sd = keras_to_state_dict(w32_256x192)
    # Official pose W32 state_dict: 1754 keys, 2 of them final_layer.{weight,bias}; 292 convs
    # and 292 BatchNorms (5 keys each) in the trunk.
    assert len(sd) == 1752
    assert sum(k.endswith(".running_mean") for k in sd) == 292
    expected_shapes = {
        "conv1.weight": (64, 3, 3, 3),
        "bn2.running_var": (64,),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.3.conv3.weight": (256, 64, 1, 1),
        "transition1.0.0.weight": (32, 256, 3, 3),
        "transition1.1.0.0.weight": (64, 256, 3, 3),
        "transition2.2.0.0.weight": (128, 64, 3, 3),
        "transition3.3.0.0.weight": (256, 128, 3, 3),
        "stage2.0.branches.1.3.conv2.weight": (64, 64, 3, 3),
        "stage2.0.fuse_layers.0.1.0.weight": (32, 64, 1, 1),
        "stage2.0.fuse_layers.1.0.0.0.weight": (64, 32, 3, 3),
        "stage3.3.fuse_layers.2.0.0.0.weight": (32, 32, 3, 3),
        "stage3.3.fuse_layers.2.0.1.0.weight": (128, 32, 3, 3),
        "stage3.3.fuse_layers.2.0.1.1.weight": (128,),
        "stage4.2.fuse_layers.0.3.0.weight": (32, 256, 1, 1),
    }
    for key, shape in expected_shapes.items():
        assert sd[key].shape == shape, key
    # The pose trunk's last module fuses only into branch 0.
    assert not any(k.startswith("stage4.2.fuse_layers.1.") for k in sd)
    assert not any(k.startswith("final_layer") for k in sd)


def test_every_stride2_conv_pads_one_on_each_side(tiny):
    stride2 = [l for l in iter_layers(tiny)
               if isinstance(l, keras.layers.Conv2D) and l.strides == (2, 2)]
    assert len(stride2) > 5
    for conv in stride2:
        assert conv.padding == "valid", conv.name
        assert tiny.get_layer(conv.name + ".pad").padding == ((1, 1), (1, 1)), conv.name


def _correlate_stride2(x, kernel, pad_top_left, pad_bottom_right):
    """NumPy reference: 3x3 stride-2 cross-correlation of one image with explicit padding."""
    xp = np.pad(x, ((pad_top_left, pad_bottom_right), (pad_top_left, pad_bottom_right), (0, 0)))
    h = (xp.shape[0] - 3) // 2 + 1
    w = (xp.shape[1] - 3) // 2 + 1
    out = np.zeros((h, w, kernel.shape[-1]))
    for dy in range(3):
        for dx in range(3):
            patch = xp[dy:dy + 2 * h:2, dx:dx + 2 * w:2, :]
            out += patch @ kernel[dy, dx]
    return out


def test_stride2_conv_matches_symmetric_padding_reference(tiny):
    rng = np.random.default_rng(0)
    for name in ("conv1", "stage2.0.fuse_layers.1.0.0.0"):
        conv = tiny.get_layer(name)
        pad = tiny.get_layer(name + ".pad")
        cin = conv.kernel.shape[2]
        x = rng.normal(size=(1, 16, 16, cin)).astype(np.float32)
        got = np.asarray(conv(pad(x)))[0]
        kernel = np.asarray(conv.kernel)
        symmetric = _correlate_stride2(x[0], kernel, 1, 1)
        bottom_right_only = _correlate_stride2(x[0], kernel, 0, 1)   # Keras 'same' on even sizes
        assert got.shape == (8, 8, conv.filters)
        np.testing.assert_allclose(got, symmetric, rtol=1e-4, atol=1e-4)
        assert np.abs(got - bottom_right_only).max() > 1e-2


def test_upsampling_is_nearest(tiny):
    ups = [l for l in iter_layers(tiny) if isinstance(l, keras.layers.UpSampling2D)]
    assert ups and all(u.interpolation == "nearest" for u in ups)
    up = tiny.get_layer("stage2.0.fuse_layers.0.1.2")
    x = np.arange(2 * 3 * 2, dtype=np.float32).reshape(1, 2, 3, 2)
    expected = x.repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_array_equal(np.asarray(up(x)), expected)


def test_batchnorm_and_conv_settings_match_pytorch(tiny):
    for layer in iter_layers(tiny):
        if isinstance(layer, keras.layers.BatchNormalization):
            assert layer.epsilon == 1e-5 == BN_EPSILON and layer.momentum == pytest.approx(0.9)
        if isinstance(layer, keras.layers.Conv2D):
            assert not layer.use_bias, layer.name


def test_branch_outputs_single_and_multi_scale(tiny):
    spec = backbone_spec(ModelConfig(backbone="hrnet_tiny"))
    x = np.zeros((1, 64, 64, 3), np.float32)
    single = branch_outputs(tiny, x)
    assert [tuple(t.shape) for t in single] == [(1, 16, 16, spec.width)]
    multi = branch_outputs(build_hrnet(spec, (64, 64, 3), multi_scale_output=True), x)
    assert [tuple(t.shape) for t in multi] == [
        (1, 16, 16, spec.width), (1, 8, 8, 2 * spec.width), (1, 4, 4, 4 * spec.width),
        (1, 2, 2, 8 * spec.width)]


def _small_cfg(**overrides):
    cfg = get_preset("tiny_synthetic")
    return cfg.replace(input_height=64, input_width=64, **overrides)


@pytest.mark.parametrize("head", ["spm", "hrnetv2"])
def test_spm_model_outputs_start_at_background(head):
    cfg = _small_cfg(head=head, skeleton="coco", dataset="coco")
    model = build_spm_model(cfg)
    assert model.name == "SpmModel"
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    for training in (False, True):
        out = model(images, training=training)
        assert tuple(out["root"].shape) == (2, 16, 16, 1)
        assert tuple(out["disp"].shape) == (2, 16, 16, 2 * 17)
        np.testing.assert_allclose(np.asarray(out["root"]), ROOT_PRIOR, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(out["disp"]), 0.0)


def test_spm_model_normalises_with_imagenet_statistics():
    model = build_spm_model(_small_cfg())
    norm = model.get_layer("normalize")
    mean = 255 * np.array([0.485, 0.456, 0.406], np.float32)
    std = 255 * np.array([0.229, 0.224, 0.225], np.float32)
    pixels = np.stack([mean, mean + std, mean - 2 * std]).reshape(1, 1, 3, 3)
    np.testing.assert_allclose(np.asarray(norm(pixels))[0, 0],
                               [[0, 0, 0], [1, 1, 1], [-2, -2, -2]], atol=1e-5)


def test_mixed_precision_outputs_are_float32():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_spm_model(_small_cfg())
        out = model(np.zeros((1, 64, 64, 3), np.float32), training=False)
        assert get_backbone(model).get_layer("conv1").compute_dtype == "bfloat16"
    finally:
        keras.config.set_dtype_policy(previous)
    assert out["root"].dtype == "float32" and out["disp"].dtype == "float32"


def test_sync_batchnorm_option():
    model = build_spm_model(_small_cfg(sync_batchnorm=True))
    bns = [l for l in iter_layers(model) if isinstance(l, keras.layers.BatchNormalization)]
    assert bns and all(bn.synchronized for bn in bns)
