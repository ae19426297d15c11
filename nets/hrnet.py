"""HRNet trunk (Sun et al., CVPR 2019) built from a stage table, in the Keras 3 functional API.

The network follows the official ``deep-high-resolution-net.pytorch`` (``lib/models/pose_hrnet.py``)
layer for layer, so that official checkpoints convert one-to-one (``nets/weights.py``):

* stem: two stride-2 3x3 convs (64 channels), each followed by BatchNorm and ReLU (stride 4);
* stage 1: bottleneck blocks (expansion 4) at stride 4;
* stages 2-4: high-resolution modules. Each module runs ``num_blocks`` basic blocks on every
  branch, then fuses: output branch ``i`` is ``ReLU(sum_j f_ij(x_j))`` where ``f_ii`` is the
  identity, ``f_ij`` for a lower-resolution ``j > i`` is 1x1 conv + BN + nearest upsampling by
  ``2**(j-i)``, and ``f_ij`` for a higher-resolution ``j < i`` is a chain of ``i-j`` stride-2 3x3
  conv + BN, with ReLU after every link but the last;
* transitions between stages: a 3x3 conv-BN-ReLU where an existing branch changes width, and a
  new lowest-resolution branch made from the previous lowest one by stride-2 3x3 conv-BN-ReLU.

Numerical details that match PyTorch: convolutions have no bias; BatchNorm uses eps 1e-5 and
momentum 0.1 in PyTorch terms (``running = 0.9 running + 0.1 batch``, Keras ``momentum=0.9``);
upsampling is nearest-neighbour; every 3x3 stride-2 conv pads one pixel on **every** side
(an explicit ``ZeroPadding2D(1)`` followed by a ``'valid'`` conv, because Keras ``'same'`` pads
only bottom/right when the size is even, which shifts the sampling grid by half a pixel).
Stride-1 3x3 convs use ``'same'``, which is symmetric for odd kernels.

As a pose trunk (``multi_scale_output=False``) the last module of stage 4 fuses only into the
highest-resolution branch, and the trunk returns ``[x0]`` (stride 4, ``C`` channels). With
``multi_scale_output=True`` (HRNetV2 heads, ImageNet checkpoints) it returns all four branches
``[x0, x1, x2, x3]`` at strides 4, 8, 16, 32.

Layer names are the official PyTorch module paths, unchanged (Keras 3 accepts dots in layer
names): the Conv2D layer ``stage2.0.fuse_layers.1.0.0.0`` holds the state_dict tensor
``stage2.0.fuse_layers.1.0.0.0.weight``, the BatchNormalization layer ``layer1.0.bn1`` holds
``layer1.0.bn1.{weight,bias,running_mean,running_var}``. Layers without weights (padding, ReLU,
sums, upsampling) get names that cannot collide with a state_dict module path (suffixes such as
``.pad``, ``.relu``, ``.add``, ``.sum``, ``.up``); only Conv2D and BatchNormalization layers take
part in weight mapping.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import keras
import numpy as np

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9          # Keras convention; PyTorch momentum 0.1
BOTTLENECK_EXPANSION = 4
STEM_STRIDE = 4


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One row of the stage table (the official ``MODEL.EXTRA.STAGEn`` section)."""
    num_modules: int
    block: str                      # "basic" | "bottleneck"
    num_blocks: Tuple[int, ...]     # per branch
    num_channels: Tuple[int, ...]   # per branch, before block expansion

    @property
    def num_branches(self) -> int:
        return len(self.num_channels)

    @property
    def out_channels(self) -> Tuple[int, ...]:
        expansion = BOTTLENECK_EXPANSION if self.block == "bottleneck" else 1
        return tuple(c * expansion for c in self.num_channels)


@dataclasses.dataclass(frozen=True)
class HRNetSpec:
    """The whole stage table: stem width and stages 1-4."""
    name: str
    stem_channels: int
    stages: Tuple[StageSpec, StageSpec, StageSpec, StageSpec]

    @property
    def width(self) -> int:
        """Channels of the stride-4 branch of stages 2-4 (the "W" of HRNet-W32)."""
        return self.stages[-1].num_channels[0]


def make_spec(name: str, width: int, modules: Sequence[int] = (1, 4, 3), blocks: int = 4,
              stem_channels: int = 64, stage1_blocks: int = 4,
              stage1_planes: Optional[int] = None) -> HRNetSpec:
    """Stage table of an HRNet with branch widths ``width * (1, 2, 4, 8)``.

    ``modules`` are the module counts of stages 2, 3, 4 and ``blocks`` the basic blocks per branch
    in each module. The official pose and classification nets use modules (1, 4, 3), 4 blocks,
    a 64-channel stem and 4 bottlenecks of 64 planes in stage 1.
    """
    if len(modules) != 3 or min(modules) < 1:
        raise ValueError(f"HRNet {name}: modules must be three positive counts (stages 2-4), "
                         f"got {tuple(modules)}")
    if min(width, blocks, stem_channels, stage1_blocks) < 1:
        raise ValueError(f"HRNet {name}: width, blocks, stem_channels and stage1_blocks must be "
                         f"positive")
    planes = stem_channels if stage1_planes is None else stage1_planes
    stage1 = StageSpec(1, "bottleneck", (stage1_blocks,), (planes,))
    rest = tuple(StageSpec(modules[n - 2], "basic", (blocks,) * n,
                           tuple(width * 2 ** b for b in range(n))) for n in (2, 3, 4))
    return HRNetSpec(name=name, stem_channels=stem_channels, stages=(stage1,) + rest)


OFFICIAL_WIDTHS = {"hrnet_w18": 18, "hrnet_w32": 32, "hrnet_w48": 48}


def backbone_spec(model_cfg) -> HRNetSpec:
    """Stage table of ``model_cfg.backbone`` (a ``config.ModelConfig``).

    ``hrnet_tiny`` reads its knobs from the ``tiny_*`` fields; its layer names are still the
    official ones, only the shapes differ.
    """
    name = model_cfg.backbone
    if name in OFFICIAL_WIDTHS:
        return make_spec(name, OFFICIAL_WIDTHS[name])
    if name == "hrnet_tiny":
        return make_spec(name, model_cfg.tiny_width, modules=model_cfg.tiny_modules,
                         blocks=model_cfg.tiny_blocks, stem_channels=model_cfg.tiny_stem_channels,
                         stage1_blocks=model_cfg.tiny_stage1_blocks,
                         stage1_planes=model_cfg.tiny_width)
    raise ValueError(f"unknown backbone {name!r}; known: {', '.join(OFFICIAL_WIDTHS)}, hrnet_tiny")


class _Builder:
    """Creates the named layers of one network; holds the options shared by all of them."""

    def __init__(self, sync_batchnorm: bool, kernel_initializer: str = "he_normal"):
        self.sync_batchnorm = sync_batchnorm
        self.kernel_initializer = kernel_initializer

    def conv(self, x, filters: int, kernel: int, stride: int, name: str):
        """Bias-free conv; stride-2 3x3 convs pad 1 on every side, as PyTorch ``padding=1``."""
        if kernel == 3 and stride == 2:
            x = keras.layers.ZeroPadding2D(1, name=name + ".pad")(x)
            padding = "valid"
        else:
            padding = "same"
        return keras.layers.Conv2D(filters, kernel, strides=stride, padding=padding,
                                   use_bias=False, kernel_initializer=self.kernel_initializer,
                                   name=name)(x)

    def bn(self, x, name: str):
        return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
                                               synchronized=self.sync_batchnorm, name=name)(x)

    @staticmethod
    def relu(x, name: str):
        return keras.layers.ReLU(name=name)(x)

    def conv_bn(self, x, filters: int, kernel: int, stride: int, prefix: str, relu: bool):
        """``prefix.0`` conv, ``prefix.1`` BN (an official ``nn.Sequential``), optional ReLU."""
        x = self.bn(self.conv(x, filters, kernel, stride, prefix + ".0"), prefix + ".1")
        return self.relu(x, prefix + ".relu") if relu else x

    # ------------------------------------------------------------------ residual blocks

    def basic_block(self, x, planes: int, name: str):
        shortcut = self._shortcut(x, planes, name)
        y = self.relu(self.bn(self.conv(x, planes, 3, 1, name + ".conv1"), name + ".bn1"),
                      name + ".relu1")
        y = self.bn(self.conv(y, planes, 3, 1, name + ".conv2"), name + ".bn2")
        y = keras.layers.Add(name=name + ".add")([y, shortcut])
        return self.relu(y, name + ".relu")

    def bottleneck(self, x, planes: int, name: str):
        shortcut = self._shortcut(x, planes * BOTTLENECK_EXPANSION, name)
        y = self.relu(self.bn(self.conv(x, planes, 1, 1, name + ".conv1"), name + ".bn1"),
                      name + ".relu1")
        y = self.relu(self.bn(self.conv(y, planes, 3, 1, name + ".conv2"), name + ".bn2"),
                      name + ".relu2")
        y = self.bn(self.conv(y, planes * BOTTLENECK_EXPANSION, 1, 1, name + ".conv3"),
                    name + ".bn3")
        y = keras.layers.Add(name=name + ".add")([y, shortcut])
        return self.relu(y, name + ".relu")

    def _shortcut(self, x, channels: int, name: str):
        """Identity, or the official ``downsample`` (1x1 conv + BN) when the width changes."""
        if x.shape[-1] == channels:
            return x
        return self.conv_bn(x, channels, 1, 1, name + ".downsample", relu=False)

    def blocks(self, x, block: str, planes: int, count: int, prefix: str):
        make = self.bottleneck if block == "bottleneck" else self.basic_block
        for b in range(count):
            x = make(x, planes, f"{prefix}.{b}")
        return x

    # ------------------------------------------------------------------ HRNet parts

    def transition(self, xs: List, channels: Sequence[int], prefix: str) -> List:
        """Official ``_make_transition_layer``: adapt existing branches, add the new ones."""
        out = []
        for i, c in enumerate(channels):
            if i < len(xs):
                if xs[i].shape[-1] == c:
                    out.append(xs[i])
                elif len(xs) > 1:
                    # The official forward feeds y_list[-1] here, not y_list[i]; no official
                    # table takes this path, so refuse rather than guess.
                    raise ValueError(f"{prefix}: changing the width of existing branch {i} "
                                     f"({xs[i].shape[-1]} -> {c}) is not supported")
                else:
                    out.append(self.conv_bn(xs[i], c, 3, 1, f"{prefix}.{i}", relu=True))
            else:
                y = xs[-1]
                steps = i + 1 - len(xs)
                for k in range(steps):
                    width = c if k == steps - 1 else xs[-1].shape[-1]
                    y = self.conv_bn(y, width, 3, 2, f"{prefix}.{i}.{k}", relu=True)
                out.append(y)
        return out

    def fuse(self, xs: List, num_outputs: int, prefix: str) -> List:
        """Official fuse layers: output ``i`` = ReLU(sum over branches ``j`` of f_ij(x_j))."""
        out = []
        for i in range(num_outputs):
            terms = []
            for j, x in enumerate(xs):
                name = f"{prefix}.fuse_layers.{i}.{j}"
                if j == i:
                    terms.append(x)
                elif j > i:
                    y = self.conv_bn(x, xs[i].shape[-1], 1, 1, name, relu=False)
                    terms.append(keras.layers.UpSampling2D(2 ** (j - i), interpolation="nearest",
                                                           name=name + ".2")(y))
                else:
                    y = x
                    for k in range(i - j):
                        last = k == i - j - 1
                        width = xs[i].shape[-1] if last else x.shape[-1]
                        y = self.conv_bn(y, width, 3, 2, f"{name}.{k}", relu=not last)
                    terms.append(y)
            y = keras.layers.Add(name=f"{prefix}.fuse.{i}.sum")(terms)
            out.append(self.relu(y, f"{prefix}.fuse.{i}.relu"))
        return out

    def hr_module(self, xs: List, stage: StageSpec, prefix: str, multi_scale_output: bool) -> List:
        xs = [self.blocks(x, stage.block, stage.num_channels[b], stage.num_blocks[b],
                          f"{prefix}.branches.{b}") for b, x in enumerate(xs)]
        if len(xs) == 1:
            return xs
        return self.fuse(xs, len(xs) if multi_scale_output else 1, prefix)


def build_hrnet(spec: HRNetSpec, input_shape: Tuple[Optional[int], Optional[int], int] = (None, None, 3),
                multi_scale_output: bool = False, sync_batchnorm: bool = False,
                name: str = "backbone") -> keras.Model:
    """The HRNet trunk as a functional Keras model.

    Args:
        spec: the stage table (:func:`make_spec`, :func:`backbone_spec`).
        input_shape: (H, W, 3) of the normalised input image; give static sizes to count MACs.
            H and W must be multiples of 32 for the four branches to line up.
        multi_scale_output: whether the last stage-4 module fuses into every branch (HRNetV2,
            ImageNet nets) or only into the stride-4 branch (the official pose trunk).
        sync_batchnorm: BatchNorm statistics synchronised across replicas of a strategy.
        name: model name; the SPM model finds its trunk under this name.

    Returns:
        A model mapping a normalised image batch to the branch outputs, highest resolution
        first: ``[x0]`` or ``[x0, x1, x2, x3]`` (Keras hands a one-output model's result back as
        a bare tensor; :func:`branch_outputs` always gives the list).
    """
    b = _Builder(sync_batchnorm)
    image = keras.Input(input_shape, name="image")
    x = b.relu(b.bn(b.conv(image, spec.stem_channels, 3, 2, "conv1"), "bn1"), "stem.relu1")
    x = b.relu(b.bn(b.conv(x, spec.stem_channels, 3, 2, "conv2"), "bn2"), "stem.relu2")
    stage1 = spec.stages[0]
    xs = [b.blocks(x, stage1.block, stage1.num_channels[0], stage1.num_blocks[0], "layer1")]
    for s, stage in enumerate(spec.stages[1:], start=2):
        xs = b.transition(xs, stage.out_channels, f"transition{s - 1}")
        for m in range(stage.num_modules):
            last = s == len(spec.stages) and m == stage.num_modules - 1
            xs = b.hr_module(xs, stage, f"stage{s}.{m}", multi_scale_output or not last)
    return keras.Model(image, xs, name=name)


def branch_outputs(trunk: keras.Model, x, **kwargs) -> List:
    """Call ``trunk`` and return its branch outputs as a list, also when there is one."""
    out = trunk(x, **kwargs)
    return list(out) if isinstance(out, (list, tuple)) else [out]


# ----------------------------------------------------------------------------- counting

def iter_layers(model: keras.Model):
    """Every layer of ``model``, descending into nested models (which are not yielded)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer)
        else:
            yield layer


def trainable_params(model: keras.Model) -> int:
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


def conv_macs(model: keras.Model) -> int:
    """Multiply-accumulates of every Conv2D of ``model`` (nested models included).

    Per conv: ``H_out * W_out * C_out * kh * kw * C_in / groups``; the kernel shape
    ``(kh, kw, C_in / groups, C_out)`` already holds the last four factors. Bias additions,
    BatchNorm, ReLU, sums and upsampling are not counted. Needs static spatial sizes (build the
    model with a fixed ``input_shape``).
    """
    total = 0
    for layer in iter_layers(model):
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, _ = layer.output.shape
            if h is None or w is None:
                raise ValueError(f"conv_macs: layer {layer.name} has no static output size; "
                                 f"build the model with a fixed input shape")
            total += h * w * int(np.prod(layer.kernel.shape))
    return int(total)
