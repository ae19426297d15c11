"""The SPM network: input normalisation, HRNet trunk, and the root / displacement heads.

``build_spm_model(cfg)`` returns a functional Keras model named ``SpmModel``:

* input ``images``: float32 RGB ``[B, H, W, 3]`` with values 0..255 (letterboxed to the
  network size ``cfg.data.input_height x input_width``);
* it normalises them itself with the ImageNet mean and standard deviation (the statistics
  HRNet's pretraining saw), so every caller feeds raw pixels;
* outputs ``{"root": [B, H/4, W/4, 1], "disp": [B, H/4, W/4, 2J]}``, float32 also under mixed
  precision; displacement channel ``2j`` is x and ``2j + 1`` is y of joint ``j``. With
  ``cfg.model.joint_heatmaps`` also ``"heatmaps": [B, H/4, W/4, J]``, one keypoint confidence map
  per joint (beyond the paper: the decoder snaps regressed joints to their peaks, nets/spr.py).

The trunk is a nested model named ``backbone`` (``nets/hrnet.py``) whose layer names are the
official HRNet state_dict module paths; head layers are named ``head.*``.

Heads (``cfg.model.head``):

* ``spm``: the head of the earlier TF implementation, on the trunk's stride-4 output:
  ``head_blocks`` shared 3x3 conv-BN-ReLU blocks of ``head_channels``, then for each output a
  3x3 conv-BN-ReLU and a 1x1 conv.
* ``hrnetv2``: the trunk keeps all four branches in its last module (multi-scale output); the
  three lower branches are upsampled bilinearly to stride 4 and concatenated with the first
  (HRNetV2, Sun et al. 2019), mixed by a 1x1 conv-BN-ReLU to ``head_channels``, then the same
  shared blocks and output branches as ``spm``.

Output layers and their initialisation, chosen so that the first predictions sit on the
background values of the targets (no loss spike at step 0, no large early gradients through the
trunk):

* root: a 1x1 conv with a sigmoid, bias initialised to ``-log((1 - p) / p)`` with ``p = 0.01``
  (the focal-loss prior of Lin et al. 2017, as in CenterNet). The map then starts at 0.01
  everywhere, stays a confidence in (0, 1) that the decoder can threshold and peak-search, and
  serves both root losses (L2 on the probability, and the focal loss, which needs one). The
  sigmoid's small slope at 0.01 does not slow the L2 fit under Adam: against a linear,
  zero-initialised root output the validation root loss after 400 steps of the tiny preset was
  12.41 vs 12.72 (docs/architecture.md, "Model and losses"). The joint heatmaps' output is built the same way.
* disp: a linear 1x1 conv with zero kernel and zero bias, so displacements start at exactly 0
  (the value the targets take nowhere but are closest to on average). The zero kernel still
  receives gradients (they depend on the features), so learning starts at the first step.
"""

from __future__ import annotations

import math
import os

import keras

from nets import weights as weights_lib
from nets.hrnet import (BN_EPSILON, BN_MOMENTUM, STEM_STRIDE, backbone_spec, branch_outputs,
                        build_hrnet)

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # RGB, for images scaled to [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
ROOT_PRIOR = 0.01                       # initial root-map value everywhere
BACKBONE_NAME = "backbone"


def build_spm_model(cfg, any_size: bool = False) -> keras.Model:
    """The SPM model of ``cfg`` (a ``config.Config``), with fresh weights; with ``any_size`` its
    input is ``[B, None, None, 3]`` (any multiple of 32: the same weights, for inference).

    ``cfg.model.backbone_weights`` is not loaded here: the training loop loads it once, when a
    run starts from nothing (a trained run carries its own weights, wherever it is moved).
    """
    mcfg = cfg.model
    if cfg.spr.output_stride != STEM_STRIDE:
        raise ValueError(f"config field 'output_stride' is {cfg.spr.output_stride}; the HRNet "
                         f"heads predict at stride {STEM_STRIDE}")
    height, width = (None, None) if any_size else (cfg.data.input_height, cfg.data.input_width)
    multi_scale = mcfg.head == "hrnetv2"
    trunk = build_hrnet(backbone_spec(mcfg), (height, width, 3), multi_scale_output=multi_scale,
                        sync_batchnorm=mcfg.sync_batchnorm, name=BACKBONE_NAME)

    images = keras.Input((height, width, 3), dtype="float32", name="images")
    x = keras.layers.Normalization(mean=[255.0 * m for m in IMAGENET_MEAN],
                                   variance=[(255.0 * s) ** 2 for s in IMAGENET_STD],
                                   name="normalize")(images)
    features = branch_outputs(trunk, x)
    head = _Head(mcfg.head_channels, mcfg.sync_batchnorm)
    x = head.merge_branches(features) if multi_scale else features[0]
    for i in range(mcfg.head_blocks):
        x = head.conv_bn_relu(x, 3, f"head.shared.{i}")
    prior_logit = -math.log((1 - ROOT_PRIOR) / ROOT_PRIOR)
    root = head.output(x, 1, "head.root", activation="sigmoid",
                       bias_initializer=keras.initializers.Constant(prior_logit))
    disp = head.output(x, 2 * cfg.skeleton.num_joints, "head.disp", activation=None,
                       bias_initializer="zeros")
    outputs = {"root": root, "disp": disp}
    if mcfg.joint_heatmaps:
        outputs["heatmaps"] = head.output(x, cfg.skeleton.num_joints, "head.joints", activation="sigmoid",
                                          bias_initializer=keras.initializers.Constant(prior_logit))
    return keras.Model(images, outputs, name="SpmModel")


class _Head:
    """Named conv-BN-ReLU pieces of the heads."""

    def __init__(self, channels: int, sync_batchnorm: bool):
        self.channels = channels
        self.sync_batchnorm = sync_batchnorm

    def conv_bn_relu(self, x, kernel: int, name: str):
        x = keras.layers.Conv2D(self.channels, kernel, padding="same", use_bias=False,
                                kernel_initializer="he_normal", name=name + ".conv")(x)
        x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
                                            synchronized=self.sync_batchnorm, name=name + ".bn")(x)
        return keras.layers.ReLU(name=name + ".relu")(x)

    def merge_branches(self, features):
        """HRNetV2: upsample every branch to stride 4, concatenate, mix with a 1x1 conv."""
        ups = [features[0]] + [
            keras.layers.UpSampling2D(2 ** b, interpolation="bilinear", name=f"head.up{b}")(f)
            for b, f in enumerate(features[1:], start=1)]
        x = keras.layers.Concatenate(name="head.concat")(ups)
        return self.conv_bn_relu(x, 1, "head.mix")

    def output(self, x, channels: int, name: str, activation, bias_initializer):
        """3x3 conv-BN-ReLU then a float32 1x1 conv (float32 outputs under mixed precision).

        The 1x1 kernel starts at zero, so the first outputs are ``activation(bias)`` whatever
        the (untrained, possibly huge in inference mode) features are.
        """
        x = self.conv_bn_relu(x, 3, name)
        return keras.layers.Conv2D(channels, 1, activation=activation, dtype="float32",
                                   kernel_initializer="zeros",
                                   bias_initializer=bias_initializer, name=name + ".out")(x)


def get_backbone(model: keras.Model) -> keras.Model:
    """The nested HRNet trunk of an SPM model."""
    try:
        return model.get_layer(BACKBONE_NAME)
    except ValueError:
        raise ValueError(f"model {model.name!r} has no nested {BACKBONE_NAME!r} trunk") from None


def load_backbone_weights(model: keras.Model, path: str) -> None:
    """Load converted trunk weights (``tools/convert_hrnet_weights.py``) into ``model``'s trunk.

    Matches layers by name; raises ValueError naming the file and every missing, unexpected or
    mis-shaped layer when the file does not fit the trunk (for example a W48 file into a W32
    model, or a single-scale pose trunk into the multi-scale trunk of the hrnetv2 head).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: backbone weights file not found")
    weights_lib.load_layer_weights(get_backbone(model), path)

