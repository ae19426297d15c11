"""The one configuration system: nested dataclasses, named presets, command-line overrides.

A :class:`Config` has one section per concern (data, augment, spr, model, loss, train). Every
field of every section is a command-line flag named after the field, ``--field-name`` (field
names are unique across sections, so no prefix is needed), for example::

    python3 main.py --preset ai_challenger_w32_512 --batch-size 16 --lr 1e-3 --anchor root

Resolution order: preset (or ``--config run_dir/config.json``), then explicit flags. The
resolved config is written as ``config.json`` beside every checkpoint; :func:`load_config`
rebuilds it from a run directory alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import os
import re
import typing
from typing import Any, Dict, Iterator, Optional, Tuple

from config.skeletons import Skeleton, get_skeleton

CONFIG_FILENAME = "config.json"


@dataclasses.dataclass
class DataConfig:
    """Where the data is and how it is batched."""
    dataset: str = "synthetic"        # annotation format and metric: the built-in synthetic set, AI Challenger json, or COCO json (any COCO-format set)
    skeleton: str = "ai_challenger"   # ai_challenger | coco | crowdpose | ochuman | auto (COCO files: the training file's category) | FILE.json
    skeleton_spec: Dict[str, Any] = dataclasses.field(default_factory=dict)  # a derived skeleton in full (written at start; no flag)
    train_json: str = ""              # training annotations (AI Challenger json, or COCO json with --dataset coco)
    train_images: str = ""            # folder of the training pictures
    val_json: str = ""                # validation annotations, scored at epoch ends with the official metric
    val_images: str = ""              # folder of the validation pictures
    synthetic_dir: str = ""           # cache of the generated synthetic set; "" = ~/.cache/spm_tf2/synthetic
    synthetic_train_images: int = 2000  # pictures of the generated synthetic training split
    synthetic_val_images: int = 200   # pictures of the generated synthetic validation split
    synthetic_seed: int = 0           # seed of the generated synthetic set (another seed: another set)
    input_height: int = 512           # network input height, a multiple of 32 (pictures are letterboxed into it)
    input_width: int = 512            # network input width, a multiple of 32
    batch_size: int = 8               # per replica; global batch = batch_size x replicas
    num_parallel_calls: int = -1      # -1 = tf.data.AUTOTUNE
    opencv_threads: int = 1           # cv2.setNumThreads when a pipeline starts (tf.data parallelises); 0 = OpenCV's default
    deterministic: bool = False       # deterministic order and augmentation (uses seed)
    seed: int = 0                     # data seed with --deterministic (else drawn at start); the validation subset
    ignore_crowd: bool = True         # ignore regions (COCO crowds, dropped people) left out of the root-map loss
    max_val_images: int = 0           # per-epoch score on a fixed, seeded subset of this size; 0 = all (the end: all)
    strict_annotations: bool = False  # a person with bad values stops the read (default: dropped, counted, logged)
    keep_empty_train_images: bool = False  # train on images without people too (COCO: ~54k of 118k)
    max_people_per_image: int = 32    # people slots per training image sent to the device (more: first 32 kept, logged)


@dataclasses.dataclass
class AugmentConfig:
    """Training augmentation ranges (imgaug); validation never augments."""
    augment: bool = True              # training augmentation on (flip, rotation, scale, translation, colour)
    rotation_deg: float = 30.0        # uniform in [-r, r]
    scale_min: float = 0.75           # smallest zoom factor, uniform in [scale_min, scale_max]
    scale_max: float = 1.25           # largest zoom factor
    translate_frac: float = 0.1       # uniform in [-t, t] of the input size
    flip_prob: float = 0.5            # probability of a horizontal flip (left and right joints swapped)
    color_mul_min: float = 0.8        # smallest brightness multiplier (on the device)
    color_mul_max: float = 1.2        # largest brightness multiplier
    grayscale_prob: float = 0.1       # probability of turning a picture grey


@dataclasses.dataclass
class SprConfig:
    """Structured Pose Representation: target encoding and decoding (nets/spr.py)."""
    output_stride: int = 4            # input pixels per output-map cell (SPM: 4)
    root_type: str = "centroid"       # centroid (paper: mean of labelled joints) | bbox_center
    anchor: str = "parent"            # parent (hierarchical reading) | root
    sigma: float = 7.0                # root Gaussian, output-map pixels
    tau: float = 7.0                  # displacement radius around the anchor, output-map pixels
    z_norm: str = "diag"              # diag: Z = sqrt(H^2 + W^2) of the output map | one: Z = 1
    z_value: float = 0.0              # Z fixed by the trained network (set when a run is loaded); 0 = from z_norm
    nms_window: int = 5               # max-pool window of the root-peak search
    score_threshold: float = 0.2      # root-peak threshold; 0.2 scored best of 0.1..0.5 (docs/training.md)
    max_people: int = 30              # top-k root peaks per image
    gather: str = "bilinear"          # nearest | bilinear reading of the displacement maps
    # Joint heatmaps (--joint-heatmaps, beyond the paper): targets and snapping
    joint_sigma: float = 1.5          # Gaussian of each joint's heatmap, output-map pixels, centred on the exact joint
    snap_radius: float = 5.0          # a regressed joint moves to the nearest heatmap peak at most this far (output-map pixels; docs/spr.md)
    snap_threshold: float = 0.1       # ... when that peak's value exceeds this; otherwise it stays where regressed


@dataclasses.dataclass
class ModelConfig:
    """HRNet trunk and SPM heads (nets/)."""
    backbone: str = "hrnet_w32"       # hrnet_w18 | hrnet_w32 | hrnet_w48 | hrnet_tiny
    head: str = "spm"                 # spm (earlier TF implementation's head) | hrnetv2
    head_channels: int = 64           # width of the head convolutions
    head_blocks: int = 2              # shared 3x3 conv-BN-ReLU blocks of the head
    joint_heatmaps: bool = False      # J keypoint heatmaps beside root and displacements (beyond the paper)
    backbone_weights: str = ""        # converted official weights (.weights.h5)
    sync_batchnorm: bool = False      # synchronized BatchNorm under a distribution strategy
    # hrnet_tiny stage table (nets/hrnet.py): branch widths tiny_width * (1, 2, 4, 8)
    tiny_width: int = 16              # hrnet_tiny: width of the highest-resolution branch
    tiny_modules: Tuple[int, ...] = (1, 2, 1)   # high-resolution modules in stages 2, 3, 4
    tiny_blocks: int = 1              # basic blocks per branch in each module
    tiny_stem_channels: int = 32      # the two stride-2 stem convs
    tiny_stage1_blocks: int = 1       # stage-1 bottlenecks (tiny_width planes, 4 * tiny_width out)


@dataclasses.dataclass
class LossConfig:
    """Losses (nets/losses.py)."""
    root_loss: str = "l2"             # l2 (paper) | focal
    disp_loss: str = "l1"             # l1 (paper) | smooth_l1
    disp_loss_norm: str = "cells"     # cells: summed over disc cells (paper) | person: mean over each channel's supervised cells
    root_loss_weight: float = 1.0     # weight of the root-map loss in the total
    disp_loss_weight: float = 0.01    # beta in the paper
    smooth_l1_beta: float = 0.01      # knee of the smooth-L1, in normalised displacement units
    focal_alpha: float = 2.0          # focal root loss (CenterNet): (1 - p)^alpha on peaks
    focal_beta: float = 4.0           # (1 - t)^beta penalty reduction near peaks
    joint_loss: str = "l2"            # l2 | focal, on the joint heatmaps (--joint-heatmaps)
    joint_loss_weight: float = 1.0    # weight of the joint-heatmap loss in the total


@dataclasses.dataclass
class TrainConfig:
    """The training loop (main.py, distribute_main.py)."""
    run_dir: str = ""                 # "" = runs/<preset>
    epochs: int = 150                 # training epochs
    steps_per_epoch: int = 0          # 0 = one pass over the training set
    optimizer: str = "adam"           # adam (adamw with weight_decay > 0) | sgd (momentum 0.9)
    lr: float = 1e-3                  # peak learning rate (for the presets: global batch 8; see --lr-base-batch)
    lr_base_batch: int = 0            # N > 0: the rate used is lr x global batch / N (linear scaling); 0 = lr as given
    lr_schedule: str = "step"         # step (x lr_decay_factor at each lr_decay_epochs) | cosine
    lr_decay_epochs: Tuple[int, ...] = (90, 120)  # step schedule: epochs at which the rate is multiplied by lr_decay_factor
    lr_decay_factor: float = 0.1      # step schedule: the factor at each decay epoch
    warmup_steps: int = 0             # linear warm-up from 0 over this many steps
    weight_decay: float = 0.0         # > 0: AdamW (decoupled decay) or SGD weight decay
    grad_clip_norm: float = 0.0       # 0 = no clipping
    mixed_precision: str = ""         # "" | float16 (dynamic loss scaling) | bfloat16 (Ampere/Hopper)
    xla: bool = False                 # compile the training step with XLA (a GPU option: 3.4x slower on a CPU here)
    steps_per_call: int = 10          # training steps per tf.function call (one host sync each)
    finetune: str = ""                # whole-model weights to start from (weights only)
    checkpoint_every_steps: int = 0   # 0 = at every epoch end only
    checkpoint_every_minutes: float = 0.0  # also a checkpoint when this much time passed since the last (0 = off)
    max_bad_steps: int = 20           # consecutive steps with a non-finite gradient (each skipped) that stop the run
    max_checkpoints: int = 3          # checkpoints kept in run_dir/checkpoints (older ones deleted)
    log_every_steps: int = 10         # TensorBoard scalars every this many steps (at call boundaries)
    eval_every_epochs: int = 1        # score the validation split every this many epochs (and at the end)
    eval_flip: bool = False           # the training loop's score with flip testing (HRNet's FLIP_TEST; model_val.py --flip)


@dataclasses.dataclass
class Config:
    preset: str = "tiny_synthetic"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    spr: SprConfig = dataclasses.field(default_factory=SprConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    @property
    def skeleton(self) -> Skeleton:
        """The skeleton: a named one, or the one derived from the data (``skeleton_spec``, kept
        in the run's config.json so that every tool rebuilds it from the run directory)."""
        if self.data.skeleton_spec:
            return _spec_skeleton(json.dumps(self.data.skeleton_spec, sort_keys=True))
        if self.data.skeleton in DERIVED_SKELETONS or self.data.skeleton.endswith(".json"):
            raise ValueError(f"skeleton {self.data.skeleton!r} is derived from the data when the run starts "
                             "(dataset.coco.resolve_skeleton); this config has not been resolved yet")
        return get_skeleton(self.data.skeleton)

    @property
    def output_shape(self) -> Tuple[int, int]:
        """(height, width) of the network output maps."""
        s = self.spr.output_stride
        return self.data.input_height // s, self.data.input_width // s

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def save(self, directory: str) -> str:
        """Write ``config.json`` into ``directory``; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_FILENAME)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(self.to_json() + "\n")
        os.replace(tmp, path)
        return path

    def replace(self, **overrides: Any) -> "Config":
        """A copy with fields overridden by bare field name (``batch_size=4``)."""
        new = Config.from_dict(self.to_dict())
        for name, value in overrides.items():
            section = _FIELD_SECTIONS.get(name)
            if section is None:
                raise KeyError(f"unknown config field {name!r}")
            target = new if section == "" else getattr(new, section)
            setattr(target, name, _coerce(_FIELD_TYPES[name], value, name))
        validate(new)
        return new

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "config") -> "Config":
        cfg = cls()
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{source}: unknown config keys {sorted(unknown)}")
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            if f.name in _SECTIONS:
                section = getattr(cfg, f.name)
                values = d[f.name]
                if not isinstance(values, dict):
                    raise ValueError(f"{source}: section {f.name!r} must be an object")
                known = {g.name for g in dataclasses.fields(section)}
                values = {k: v for k, v in values.items() if k not in REMOVED_FIELDS}
                bad = set(values) - known
                if bad:
                    raise ValueError(f"{source}: unknown keys {sorted(bad)} in section {f.name!r}")
                for k, v in values.items():
                    setattr(section, k, _coerce(_FIELD_TYPES[k], v, k))
            else:
                setattr(cfg, f.name, d[f.name])
        return cfg


@functools.lru_cache(maxsize=16)
def _spec_skeleton(spec_json: str) -> Skeleton:
    return Skeleton.from_dict(json.loads(spec_json), "config field 'skeleton_spec'")


# ``--skeleton auto``: the skeleton of the training file's category (COCO format).
DERIVED_SKELETONS = ("auto",)
# The skeleton a data set takes when --dataset changes it and --skeleton is not given.
DATASET_SKELETONS = {"synthetic": "ai_challenger", "ai_challenger": "ai_challenger", "coco": "auto"}
# Fields the command line does not set (written by the program).
NOT_FLAGS = frozenset({"skeleton_spec"})

_SECTIONS = ("data", "augment", "spr", "model", "loss", "train")
# Fields that earlier versions wrote and that no longer mean anything: read and dropped, so that
# run directories made before keep loading (shuffle_buffer: every pass is a full permutation now).
REMOVED_FIELDS = frozenset({"shuffle_buffer"})
_SECTION_CLASSES = {"data": DataConfig, "augment": AugmentConfig, "spr": SprConfig,
                    "model": ModelConfig, "loss": LossConfig, "train": TrainConfig}


def _iter_fields() -> Iterator[Tuple[str, dataclasses.Field, Any]]:
    """(section, field, resolved type) for every leaf field; section "" for top-level ones."""
    for section, klass in _SECTION_CLASSES.items():
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            yield section, f, hints[f.name]


_FIELD_SECTIONS: Dict[str, str] = {}
_FIELD_TYPES: Dict[str, Any] = {}
for _section, _field, _type in _iter_fields():
    if _field.name in _FIELD_SECTIONS or _field.name == "preset":
        raise RuntimeError(f"config field name {_field.name!r} is not unique across sections")
    _FIELD_SECTIONS[_field.name] = _section
    _FIELD_TYPES[_field.name] = _type


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Convert a JSON or command-line value to the field's declared type."""
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if origin is tuple:
            (elem, *_rest) = typing.get_args(tp)
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            return tuple(elem(v) for v in value)
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return tp(value)
    except (TypeError, ValueError):
        raise ValueError(f"config field {name!r}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None


# ----------------------------------------------------------------------------- presets

def _tiny_synthetic() -> Config:
    """Trains on a laptop CPU in minutes: small HRNet, 256x256 input, synthetic data."""
    cfg = Config(preset="tiny_synthetic")
    cfg.data.dataset = "synthetic"
    cfg.data.input_height = cfg.data.input_width = 256
    cfg.data.batch_size = 8
    cfg.model.backbone = "hrnet_tiny"
    cfg.model.head_channels = 32
    cfg.model.head_blocks = 1
    cfg.spr.sigma = 2.0
    cfg.spr.tau = 3.0
    # Measured on the synthetic set, 1000 steps each (docs/training.md, "What the default training
    # reaches"): displacement weight 1.0 instead of the paper's 0.01 (0.0137 -> 0.129 with milder
    # augmentation), then the focal root loss (0.129 -> 0.142).
    cfg.loss.disp_loss_weight = 1.0
    cfg.loss.root_loss = "focal"
    cfg.augment.rotation_deg = 15.0
    cfg.augment.scale_min = 0.85
    cfg.augment.scale_max = 1.15
    # Joint heatmaps and snapping (docs/spr.md, "Joint heatmaps"): 0.203 -> 0.368 at 1500 steps.
    cfg.model.joint_heatmaps = True
    # 5 epochs of 250 steps fit the 15-minute budget of a 2-core CPU; cosine with warm-up and
    # Adam 8e-3 (2e-3: 0.342, 4e-3: 0.440, 8e-3: 0.494 at 1250 steps; docs/training.md).
    cfg.train.epochs = 5
    cfg.train.steps_per_epoch = 225        # 1125 steps (250 a pass of the 2000 images: 0.5104, 8 min 50 s)
    cfg.data.max_val_images = 100          # per-epoch score on 100 images, the last one on all 200
    cfg.train.lr = 8e-3
    cfg.train.lr_schedule = "cosine"
    cfg.train.warmup_steps = 100
    cfg.train.lr_decay_epochs = (3, 4)     # for --lr-schedule step
    # The score is flip-tested, as HRNet's configs test (0.494 -> 0.531 on the 8e-3 run);
    # tools/model_val.py without --flip gives the plain number.
    cfg.train.eval_flip = True
    return cfg


def _ai_challenger_w32_512() -> Config:
    cfg = Config(preset="ai_challenger_w32_512")
    cfg.data.dataset = "ai_challenger"
    cfg.data.skeleton = "ai_challenger"
    cfg.data.batch_size = 8
    cfg.model.backbone = "hrnet_w32"
    # What learns at this geometry (tools/benchmark.py recipe, docs/training.md "The 512 presets
    # rehearsed"): displacement weight 1.0 and the focal root loss (the paper's 0.01 and L2 learn
    # slowest), joint heatmaps and cosine with warm-up: 0.0314 -> 0.3776 after 2000 steps of a small
    # trunk at this geometry. Paper: --disp-loss-weight 0.01 --root-loss l2 --no-joint-heatmaps
    # --lr-schedule step --warmup-steps 0.
    cfg.loss.disp_loss_weight = 1.0
    cfg.loss.root_loss = "focal"
    cfg.model.joint_heatmaps = True
    # Adam 1e-3 for a global batch of 8 (--lr-base-batch 8 scales it with the global batch),
    # cosine over 150 epochs after 1000 warm-up steps (the rehearsal warmed up for 5% of its run;
    # 1000 steps of a 150-epoch run is a choice, not a measurement). The earlier TF
    # implementation's step schedule (x0.1 at epochs 90 and 120) is --lr-schedule step
    # --warmup-steps 0.
    cfg.train.epochs = 150
    cfg.train.lr = 1e-3
    cfg.train.lr_schedule = "cosine"
    cfg.train.warmup_steps = 1000
    cfg.train.lr_decay_epochs = (90, 120)
    # Evaluation that fits 30,000 validation images: every 5 epochs on a fixed, seeded subset of
    # 3000 (about 3 minutes on one GPU), the whole split at the end and in tools/model_val.py.
    cfg.train.eval_every_epochs = 5
    cfg.data.max_val_images = 3000
    # An AI Challenger epoch is ~26,000 steps at batch 8 on one GPU: a checkpoint every 30 minutes
    # as well, so that a preemption or a crash costs at most that.
    cfg.train.checkpoint_every_minutes = 30.0
    return cfg


def _coco_w32_512() -> Config:
    cfg = _ai_challenger_w32_512()
    cfg.preset = "coco_w32_512"
    cfg.data.dataset = "coco"
    cfg.data.skeleton = "coco"
    cfg.data.max_val_images = 0       # val2017's 5000 images: all of them
    # COCO AP is a ranking over scored people: low-confidence people add recall at no cost
    # (peers keep them); the AI Challenger score's denominator counts every extra person.
    cfg.spr.score_threshold = 0.05
    return cfg


PRESETS = {
    "tiny_synthetic": _tiny_synthetic,
    "ai_challenger_w32_512": _ai_challenger_w32_512,
    "coco_w32_512": _coco_w32_512,
}

DEFAULT_PRESET = "tiny_synthetic"


def get_preset(name: str) -> Config:
    try:
        cfg = PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation

_CHOICES = {
    "dataset": ("synthetic", "ai_challenger", "coco"),
    "root_type": ("centroid", "bbox_center"),
    "anchor": ("parent", "root"),
    "z_norm": ("diag", "one"),
    "gather": ("nearest", "bilinear"),
    "backbone": ("hrnet_w18", "hrnet_w32", "hrnet_w48", "hrnet_tiny"),
    "head": ("spm", "hrnetv2"),
    "root_loss": ("l2", "focal"),
    "joint_loss": ("l2", "focal"),
    "disp_loss": ("l1", "smooth_l1"),
    "disp_loss_norm": ("cells", "person"),
    "lr_schedule": ("step", "cosine"),
    "optimizer": ("adam", "sgd"),
    "mixed_precision": ("", "float16", "bfloat16"),
}


def validate(cfg: Config) -> None:
    """Raise ValueError naming the field for an impossible configuration."""
    for section in _SECTIONS:
        sec = getattr(cfg, section)
        for name, choices in _CHOICES.items():
            if hasattr(sec, name) and getattr(sec, name) not in choices:
                raise ValueError(f"config field {name!r} is {getattr(sec, name)!r}; "
                                 f"choose one of {', '.join(repr(c) for c in choices)}")
    if cfg.data.skeleton_spec:
        cfg.skeleton                                   # raises naming the problem
    elif cfg.data.skeleton not in DERIVED_SKELETONS and not cfg.data.skeleton.endswith(".json"):
        get_skeleton(cfg.data.skeleton)
    s = cfg.spr.output_stride
    for name in ("input_height", "input_width"):
        v = getattr(cfg.data, name)
        if v <= 0 or v % (8 * s) != 0:
            raise ValueError(f"config field {name!r} is {v}; it must be a positive multiple of "
                             f"{8 * s} (HRNet's lowest branch is at stride 32)")
    positive = {"batch_size": cfg.data.batch_size, "sigma": cfg.spr.sigma, "tau": cfg.spr.tau,
                "joint_sigma": cfg.spr.joint_sigma,
                "max_people": cfg.spr.max_people, "epochs": cfg.train.epochs,
                "nms_window": cfg.spr.nms_window, "steps_per_call": cfg.train.steps_per_call,
                "max_bad_steps": cfg.train.max_bad_steps,
                "max_people_per_image": cfg.data.max_people_per_image}
    for name, v in positive.items():
        if not v > 0:
            raise ValueError(f"config field {name!r} must be positive, got {v}")
    for name in ("lr_base_batch", "checkpoint_every_steps", "checkpoint_every_minutes"):
        if getattr(cfg.train, name) < 0:
            raise ValueError(f"config field {name!r} must be >= 0 (0: off), got {getattr(cfg.train, name)}")
    if cfg.spr.snap_radius < 0:
        raise ValueError(f"config field 'snap_radius' must be >= 0 (0: no snapping), got {cfg.spr.snap_radius}")
    if cfg.augment.scale_min > cfg.augment.scale_max:
        raise ValueError("config fields 'scale_min' > 'scale_max'")
    if cfg.augment.color_mul_min > cfg.augment.color_mul_max:
        raise ValueError("config fields 'color_mul_min' > 'color_mul_max'")
    if cfg.data.dataset in ("ai_challenger", "synthetic") and cfg.data.skeleton != "ai_challenger":
        raise ValueError(f"dataset {cfg.data.dataset!r} uses the ai_challenger skeleton, not "
                         f"{cfg.data.skeleton!r} (other skeletons: --dataset coco with a COCO-format file)")


# ----------------------------------------------------------------------------- resuming a run

# Fields that change what a checkpoint means (the network, its targets and losses, the optimizer
# and its schedule, the data stream): a resumed run must keep them. Everything else (epochs,
# paths, logging, evaluation, decoding, augmentation ranges, batch layout: checked by the
# training loop) may change on resume and is recorded.
RESUME_FIXED_SECTIONS = ("model", "loss")
RESUME_FIXED_FIELDS = (
    "input_height", "input_width", "seed", "deterministic", "steps_per_epoch",
    "output_stride", "root_type", "anchor", "sigma", "tau", "z_norm", "z_value", "joint_sigma",
    "optimizer", "lr", "lr_base_batch", "lr_schedule", "lr_decay_epochs", "lr_decay_factor",
    "warmup_steps", "weight_decay", "mixed_precision")
RESUME_FREE_MODEL_FIELDS = ("backbone_weights", "sync_batchnorm")


def resume_differences(old: Config, new: Config) -> Tuple[list, list]:
    """``(refused, allowed)``: lists of ``(field, old value, new value)`` between the config a
    run directory was started with and the one resuming it. The skeleton is compared by its
    content (names, hierarchy, flip pairs, sigmas), not only its name."""
    refused, allowed = [], []
    for section, f, _ in _iter_fields():
        a, b = getattr(getattr(old, section), f.name), getattr(getattr(new, section), f.name)
        if a == b:
            continue
        fixed = ((section in RESUME_FIXED_SECTIONS and f.name not in RESUME_FREE_MODEL_FIELDS)
                 or f.name in RESUME_FIXED_FIELDS)
        (refused if fixed else allowed).append((f.name, a, b))
    try:
        same_skeleton = old.skeleton == new.skeleton
    except ValueError:
        same_skeleton = False
    if not same_skeleton:
        refused.append(("skeleton", old.data.skeleton, new.data.skeleton))
        allowed = [d for d in allowed if d[0] != "skeleton"]
    return refused, allowed


# ----------------------------------------------------------------------------- loading and CLI

def load_config(path: str) -> Config:
    """Rebuild a Config from ``config.json`` or from a run directory holding one."""
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_FILENAME)
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such config file (a run directory holds {CONFIG_FILENAME})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a config must be a JSON object")
    cfg = Config.from_dict(d, source=path)
    validate(cfg)
    return cfg


def field_help() -> Dict[str, str]:
    """Each config field's description: the comment after it in this file's dataclasses (and the
    comment lines right below it), the one place they are written."""
    out: Dict[str, str] = {}
    for klass in _SECTION_CLASSES.values():
        last = None
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s+(\w+)\s*:[^=#]+=.*?#\s*(.*)$", line)
            if m:
                last = m.group(1)
                out[last] = m.group(2).strip()
            elif last and re.match(r"\s+#\s", line) and out.get(last, "").endswith(("...", ",")):
                out[last] += " " + line.strip()[1:].strip()
            else:
                last = None
    return out


def _preset_values(name: str, presets: Dict[str, "Config"], base: Any) -> str:
    """``; presets: a 256, b 512`` for the presets whose value of field ``name`` is not ``base``."""
    differ = [f"{p} {_field_value(cfg, name)!r}" for p, cfg in presets.items() if _field_value(cfg, name) != base]
    return f"; presets: {', '.join(differ)}" if differ else ""


def _field_value(cfg: "Config", name: str) -> Any:
    return getattr(getattr(cfg, _FIELD_SECTIONS[name]), name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--preset``, ``--config`` and one flag per config field to ``parser``."""
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help=f"named preset (default: {DEFAULT_PRESET})")
    parser.add_argument("--config", default=None, metavar="JSON_OR_RUN_DIR",
                        help="start from a saved config.json (or a run directory) instead of a preset")
    defaults = Config()
    docs = field_help()
    presets = {name: make() for name, make in PRESETS.items()}
    for section, f, tp in _iter_fields():
        if f.name in NOT_FLAGS:
            continue
        group_title = f"config: {section}"
        group = next((g for g in parser._action_groups if g.title == group_title), None)
        if group is None:
            group = parser.add_argument_group(group_title)
        default = getattr(getattr(defaults, section), f.name)
        described = docs.get(f.name, "")
        choices = f"one of {', '.join(repr(c) for c in _CHOICES[f.name])}; " if f.name in _CHOICES else ""
        where = f"(base default {default!r}{_preset_values(f.name, presets, default)})"
        kwargs: Dict[str, Any] = dict(dest=f"cfg__{f.name}", default=None,
                                      help=f"{described} {choices}{where}".strip().replace("%", "%%"))
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = "V,V" if typing.get_origin(tp) is tuple else tp.__name__.upper()
        group.add_argument(_flag(f.name), **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Resolve preset / saved config, then apply every flag given on the command line."""
    if getattr(args, "config", None):
        cfg = load_config(args.config)
        if args.preset and args.preset != cfg.preset:
            raise ValueError(f"--preset {args.preset} conflicts with --config {args.config} "
                             f"(preset {cfg.preset})")
    else:
        cfg = get_preset(args.preset or DEFAULT_PRESET)
    overrides = {k[len("cfg__"):]: v for k, v in vars(args).items()
                 if k.startswith("cfg__") and v is not None}
    if "dataset" in overrides and "skeleton" not in overrides and overrides["dataset"] != cfg.data.dataset:
        # another data set, no --skeleton: the data set's own (COCO files: their category's)
        overrides["skeleton"] = DATASET_SKELETONS.get(overrides["dataset"], cfg.data.skeleton)
    if "skeleton" in overrides:
        overrides["skeleton_spec"] = {}
    return cfg.replace(**overrides) if overrides else cfg


def parse_config(argv: Optional[list] = None, description: str = "") -> Tuple[Config, argparse.Namespace]:
    """Convenience for scripts that take only config flags."""
    parser = add_config_args(argparse.ArgumentParser(description=description))
    args = parser.parse_args(argv)
    return config_from_args(args), args
