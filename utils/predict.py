"""Predict: rebuild a trained model from its run directory and turn images into poses.

One path serves the training loop's evaluation (``utils/evaluation.py``), ``tools/model_val.py``,
``tools/spm_model_test.py``, the ``infer`` benchmark and the exported model (``utils/export.py``):

    model, cfg = load_trained_model(run_dir)              # config.json + weights
    predictor = Predictor(model, cfg, flip=False)         # network + in-graph SPR decoder
    predictions, _ = predict_records(predictor, records)  # poses in original image coordinates
    predictions = predict_images(predictor, images)       # in-memory images of any size, 8 at a time
    predictions = predict_images(predictor, images, long_side=1024)   # each at its own input size

Any input size works (a multiple of 32; :func:`input_size` for ``--long-side``): the decoder
always uses the displacement scale Z of the *training* input (``load_trained_model`` fixes
``spr.z_value``), which is what the network learned.

Flip testing (``flip=True``) runs the network on the image and on its mirror, mirrors the second
maps back (left and right channels swapped, x displacements negated: ``nets.spr.flip_maps``).
Multi-scale testing (``scales=(0.5, 1, 2)``) runs the network on the *original* picture
letterboxed at each scale's input size (the scale-1 input times the factor, rounded to a multiple
of 32, as HigherHRNet and DEKR do) and resamples every scale's maps onto the maps of scale 1
through the two letterboxes (the displacements divided by the size ratio, so they stay in
scale-1 map pixels).
All maps are averaged and decoded once (:func:`network_maps`). A model trained with
``--joint-heatmaps`` has a third map, mirrored (``nets.spr.flip_heatmaps``), resized and averaged
the same way, and the decoder snaps joints to its peaks.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from config import CONFIG_FILENAME, Config, load_config
from config.skeletons import Skeleton
from dataset.letterbox import letterbox_sizes, to_original
from dataset.pipeline import ImageError, InputPipeline, read_rgb
from dataset.records import ImageRecord
from nets.spm_model import build_spm_model
from nets.spr import flip_heatmaps, flip_maps, make_decoder, z_factor

WEIGHT_FILES = ("best.weights.h5", "final.weights.h5")


# ----------------------------------------------------------------------------- loading

def resolve_weights(path: str) -> Tuple[str, str]:
    """(config.json path, weights path) of a run directory, a ``.weights.h5`` file or a
    checkpoint prefix.

    A run directory gives its best weights, else its final weights, else its latest
    checkpoint; a weights file takes the ``config.json`` beside it; a checkpoint prefix in
    ``RUN/checkpoints/`` takes ``RUN/config.json``.
    """
    if os.path.isdir(path):
        config_path = os.path.join(path, CONFIG_FILENAME)
        for name in WEIGHT_FILES:
            if os.path.exists(os.path.join(path, name)):
                return config_path, os.path.join(path, name)
        latest = tf.train.latest_checkpoint(os.path.join(path, "checkpoints"))
        if latest:
            return config_path, latest
        raise FileNotFoundError(f"{path}: no weights found (expected one of {', '.join(WEIGHT_FILES)} "
                                f"or checkpoints/)")
    if not os.path.exists(path) and not os.path.exists(path + ".index"):
        raise FileNotFoundError(f"{path}: no such run directory or weights file")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(folder) == "checkpoints" and not os.path.exists(os.path.join(folder, CONFIG_FILENAME)):
        folder = os.path.dirname(folder)
    return os.path.join(folder, CONFIG_FILENAME), path


def load_trained_model(path: str, config_path: Optional[str] = None, expect_skeleton: Optional[str] = None,
                       overrides: Optional[Dict[str, Any]] = None):
    """Rebuild the model of a run and load its weights: returns ``(model, cfg)``.

    Args:
        path: a run directory, a ``.weights.h5`` file or a checkpoint prefix.
        config_path: the config to build the model from (default: the run's ``config.json``).
        expect_skeleton: refuse, with a clear message, a model of another skeleton.
        overrides: config fields to change before building, e.g. another ``input_height`` (the
            network is fully convolutional, the weights fit any multiple of 32) or decoder
            settings (``score_threshold``, ``nms_window``).

    The returned config's ``z_value`` is the training input's displacement scale Z, whatever the
    overrides: decoding at another input size is exact only with the Z the network learned.
    """
    default_config, weights = resolve_weights(path)
    config_path = config_path or default_config
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: no config beside the weights {weights}; pass the "
                                f"run directory, or --config with the training config.json")
    cfg = load_config(config_path)
    if expect_skeleton and cfg.data.skeleton != expect_skeleton:
        raise ValueError(f"{path} is a model of the {cfg.data.skeleton} skeleton "
                         f"({cfg.skeleton.num_joints} joints, preset {cfg.preset}); these annotations "
                         f"need the {expect_skeleton} skeleton")
    trained_z = cfg.spr.z_value or z_factor(*cfg.output_shape, cfg.spr.z_norm)
    cfg = cfg.replace(**{"z_value": trained_z, **(overrides or {})})
    model = build_spm_model(cfg, any_size=True)
    try:
        if weights.endswith(".h5"):
            model.load_weights(weights)
        else:
            tf.train.Checkpoint(model=model).restore(weights).expect_partial().assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{weights}: these weights do not fit the model of {config_path} (backbone "
                         f"{cfg.model.backbone}, head {cfg.model.head}, skeleton {cfg.data.skeleton}): "
                         f"{first}") from None
    return model, cfg


# ----------------------------------------------------------------------------- prediction

def input_size(height: int, width: int, long_side: int, multiple: int = 32) -> Tuple[int, int]:
    """Network input (H, W) for an image of ``height x width`` at ``long_side`` pixels on its
    longer side, aspect ratio kept: the letterboxed size rounded up to a multiple of 32."""
    if long_side <= 0 or long_side % multiple:
        raise ValueError(f"--long-side {long_side} must be a positive multiple of {multiple}")
    s = long_side / max(height, width)
    return (max(multiple, -(-round(height * s) // multiple) * multiple),
            max(multiple, -(-round(width * s) // multiple) * multiple))


def parse_scales(text: str) -> Tuple[float, ...]:
    """``"0.5,1,2"`` -> (0.5, 1.0, 2.0): the ``--scales`` of the tools (positive factors)."""
    try:
        scales = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--scales must be comma-separated numbers such as 0.5,1,2, got {text!r}") from None
    if not scales or min(scales) <= 0:
        raise ValueError(f"--scales must be positive, got {text!r}")
    return scales


def scaled_input_size(height: int, width: int, scale: float, multiple: int = 32) -> Tuple[int, int]:
    """The network input of one test scale: the scale-1 input ``height x width`` times ``scale``,
    each side rounded to a multiple of 32 (HigherHRNet's and DEKR's rule)."""
    return tuple(max(multiple, int(round(v * scale / multiple)) * multiple) for v in (height, width))


def _to_reference(maps, letterbox, reference, map_hw, num_joints: int):
    """Maps of one scale's input (letterbox ``[B, 4]`` of the original picture into that input)
    resampled onto the map grid of the scale-1 input (letterbox ``reference``, maps ``map_hw``).

    Both inputs letterbox the same original picture, so a scale-1 map point ``m`` (continuous,
    map pixels) is the scale's map point ``a * m + (pad - a * pad_ref) / 4`` with ``a`` the ratio
    of the two letterboxes' factors, per axis and per image: exact whatever the rounding of either
    input size. Displacements are divided by ``a`` (scale-1 map pixels)."""
    a = letterbox[:, :2] / reference[:, :2]                                   # [B, 2] (x, y)
    shift = (letterbox[:, 2:] - a * reference[:, 2:]) / 4.0
    offset = 0.5 * a + shift - 0.5                                            # pixel centres
    zero = tf.zeros_like(a[:, 0])
    # ImageProjectiveTransformV3 maps each output pixel (x, y) to the input pixel it samples.
    transform = tf.stack([a[:, 0], zero, offset[:, 0], zero, a[:, 1], offset[:, 1], zero, zero], axis=1)

    def warp(m):
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=m, transforms=transform, output_shape=map_hw, fill_value=0.0,
            interpolation="BILINEAR", fill_mode="CONSTANT")

    root, disp, heat = maps
    disp = warp(disp) / tf.tile(a, [1, num_joints])[:, None, None, :]
    return warp(root), disp, None if heat is None else warp(heat)


def network_maps(model, images, skeleton: Skeleton, flip: bool = False, scales: Sequence[float] = (1.0,),
                 letterbox=None, scaled: Sequence[Tuple[Any, Any]] = ()):
    """float32 ``(root, disp)`` maps of a letterboxed batch [B, H, W, 3] (uint8 or float, 0..255),
    or ``(root, disp, heatmaps)`` for a model with joint heatmaps, at the maps' size of
    ``images``: the average over ``scales`` (and, with ``flip``, over the mirrored images, their
    maps mirrored back). The one flip and scale averaging of the repository: the predictor and
    the exported model both call it.

    Multi-scale testing runs the network on the *original* picture letterboxed at each scale's
    input size (:func:`scaled_input_size`), not on ``images`` resized: ``scaled`` holds one
    ``(images, letterbox [B, 4])`` per scale other than 1, in the order of ``scales``, and
    ``letterbox`` is the letterbox of ``images`` (the reference every scale's maps are resampled
    onto, :func:`_to_reference`). ``images`` is run only when 1 is among ``scales``."""
    shape = tf.shape(images)
    map_hw = tf.stack([shape[1] // 4, shape[2] // 4])
    others = [s for s in scales if s != 1.0]
    if len(scaled) != len(others):
        raise ValueError(f"scales {tuple(scales)} need {len(others)} scaled inputs, got {len(scaled)}")
    if others and letterbox is None:
        raise ValueError("multi-scale testing needs the letterbox of the scale-1 images")
    views, pending = [], iter(scaled)
    for scale in scales:
        views.append((images, None) if scale == 1.0 else next(pending))
    roots, disps, heats = [], [], []
    for x, box in views:
        x = tf.cast(x, tf.float32)
        for view, mirrored in [(x, False)] + ([(tf.reverse(x, axis=[2]), True)] if flip else []):
            out = model(view, training=False)
            root, disp = tf.cast(out["root"], tf.float32), tf.cast(out["disp"], tf.float32)
            heat = tf.cast(out["heatmaps"], tf.float32) if "heatmaps" in out else None
            if mirrored:
                root, disp = flip_maps(root, disp, skeleton)
                heat = None if heat is None else flip_heatmaps(heat, skeleton)
            if box is not None:
                root, disp, heat = _to_reference((root, disp, heat), tf.cast(box, tf.float32),
                                                 tf.cast(letterbox, tf.float32), map_hw, skeleton.num_joints)
            roots.append(root)
            disps.append(disp)
            if heat is not None:
                heats.append(heat)
    maps = (tf.add_n(roots) / len(roots), tf.add_n(disps) / len(disps))
    return maps + (tf.add_n(heats) / len(heats),) if heats else maps


def letterbox_scales(image: np.ndarray, height: int, width: int, scales: Sequence[float]):
    """One picture letterboxed for every scale: ``(scale-1 image, its Letterbox, [(image,
    Letterbox) per scale other than 1])``, each from the original picture."""
    (base, lb), *scaled = letterbox_sizes(image, [(height, width)] + [scaled_input_size(height, width, s)
                                                                       for s in scales if s != 1.0])
    return base, lb, scaled


class Predictor:
    """Network + SPR decoder in one graph: images [B, H, W, 3] (uint8 or float32, 0..255,
    letterboxed, any H and W multiple of 32) -> poses [B, K, J, 2] (network-input pixels),
    scores [B, K], num_people [B]; ``flip`` and ``scales`` as :func:`network_maps` (with scales
    other than 1, the call takes each scale's input too: :func:`letterbox_scales`)."""

    def __init__(self, model, cfg: Config, flip: bool = False, scales: Sequence[float] = (1.0,)):
        self.model, self.cfg, self.flip, self.scales = model, cfg, flip, tuple(float(s) for s in scales)
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive numbers, got {scales}")
        self.maps = tf.function(
            lambda images, letterbox, scaled: network_maps(model, images, cfg.skeleton, flip, self.scales,
                                                           letterbox, scaled),
            reduce_retracing=True, autograph=False)
        # The decoder alone is compiled with XLA (about 2.5x faster on CPU, nets/spr.py); the
        # network is left to the regular graph. XLA compiles again for each new map size (about 2 s
        # on this CPU with heatmaps), so pictures of many sizes (``--long-side``) are decoded by the same
        # decoder as a plain graph, traced once for every size (``any_size``).
        self.decode = make_decoder(cfg.skeleton, cfg.spr, None, jit_compile=True,
                                   heatmaps=cfg.model.joint_heatmaps)
        self._decode_any_size = None

    @property
    def multi_scale(self) -> bool:
        return self.scales != (1.0,)

    def decoder(self, any_size: bool = False):
        """The decoder: compiled with XLA (one compilation per map size), or with ``any_size``
        the plain graph (one trace for every size; a call about twice as slow on CPU)."""
        if not any_size:
            return self.decode
        if self._decode_any_size is None:
            self._decode_any_size = make_decoder(self.cfg.skeleton, self.cfg.spr, None, jit_compile=False,
                                                 heatmaps=self.cfg.model.joint_heatmaps)
        return self._decode_any_size

    def __call__(self, images, letterbox=None, scaled=(), any_size: bool = False):
        """:class:`nets.spr.Decoded` of a batch [B, H, W, 3] letterboxed at the scale-1 input;
        with several scales, ``letterbox`` [B, 4] is that batch's letterbox and ``scaled`` one
        ``(images, letterbox)`` batch per other scale (:func:`network_maps`). ``any_size``: the
        input size changes from call to call (:meth:`decoder`)."""
        if letterbox is None:
            if self.multi_scale:
                raise ValueError(f"scales {self.scales} need the letterbox and each scale's input "
                                 "(utils.predict.letterbox_scales)")
            letterbox = tf.zeros([tf.shape(images)[0], 4], tf.float32)
        scaled = tuple((tf.convert_to_tensor(x), tf.convert_to_tensor(b, tf.float32)) for x, b in scaled)
        return self.decoder(any_size)(*self.maps(tf.convert_to_tensor(images),
                                                 tf.convert_to_tensor(letterbox, tf.float32), scaled))


@dataclasses.dataclass
class Prediction:
    """The people found in one image, in its original coordinates."""
    record: Optional[ImageRecord]   # None for images given as arrays
    poses: np.ndarray               # float64 [n, J, 2]
    scores: np.ndarray              # float64 [n], root peak values
    roots: np.ndarray               # float64 [n, 2], root positions


def _unbatch(decoded, letterboxes, records) -> List[Prediction]:
    """Split a decoded batch into per-image predictions in original coordinates."""
    poses, scores, num, roots = (t.numpy() for t in decoded)
    out = []
    for b, (lb, record) in enumerate(zip(letterboxes, records)):
        n = int(num[b])
        out.append(Prediction(record, to_original(poses[b, :n], lb), scores[b, :n].astype(np.float64),
                              to_original(roots[b, :n], lb)))
    return out


def predict_records(predictor: Predictor, records: Sequence[ImageRecord], batch_size: int = 8,
                    progress: bool = False, long_side: int = 0) -> Tuple[List[Prediction], InputPipeline]:
    """Predict every record's image with the evaluation pipeline (decode + letterbox in parallel,
    every test scale from the original picture), or, with ``long_side``, one image at a time,
    each at its own input size.

    Returns ``(predictions, pipeline)``; images that cannot be read are skipped with a warning and
    counted in ``pipeline.skipped`` (they get no prediction).
    """
    pipeline = InputPipeline(predictor.cfg, "val", records)
    bar = keras.utils.Progbar(len(records), unit_name="image") if progress else None
    out: List[Prediction] = []
    if long_side:
        for done, record in enumerate(records, start=1):
            try:
                image = read_rgb(record.image_path)
            except ImageError as e:
                pipeline.skipped.add(e)
                continue
            out.extend(predict_images(predictor, [image], long_side, [record]))
            if bar is not None:
                bar.update(done)
        return out, pipeline
    h, w = pipeline.input_hw
    sizes = [scaled_input_size(h, w, s) for s in predictor.scales if s != 1.0]
    done = 0
    for images, info in pipeline.eval_dataset(batch_size, sizes):
        scaled = list(zip(info["scaled_images"], tf.unstack(info["scaled_letterboxes"], axis=1))) if sizes else ()
        out.extend(_unbatch(predictor(images, info["letterbox"], scaled), info["letterbox"].numpy(),
                            [pipeline.records[int(i)] for i in info["index"].numpy()]))
        done += len(images)
        if bar is not None:
            bar.update(done)
    return out, pipeline


def iter_predictions(predictor: Predictor, images: Iterable[np.ndarray], long_side: int = 0,
                     records: Optional[Iterable[Optional[ImageRecord]]] = None,
                     batch_size: int = 8) -> Iterator[Prediction]:
    """:func:`predict_images` one picture at a time: reads ``images`` (any iterable, e.g. a
    generator over files) ``batch_size`` pictures at a time, so memory stays flat in their number."""
    cfg = predictor.cfg
    records = iter(records) if records is not None else itertools.repeat(None)
    pictures = iter(images)
    batch_size = 1 if long_side else max(1, int(batch_size))
    while True:
        chunk = list(itertools.islice(pictures, batch_size))
        if not chunk:
            return
        owners = [next(records) for _ in chunk]
        h, w = (input_size(chunk[0].shape[0], chunk[0].shape[1], long_side) if long_side
                else (cfg.data.input_height, cfg.data.input_width))
        views = [letterbox_scales(image, h, w, predictor.scales) for image in chunk]
        boxes = [lb for _, lb, _ in views]
        scaled = [(np.stack([v[2][k][0] for v in views]), np.stack([v[2][k][1].as_array() for v in views]))
                  for k in range(len(views[0][2]))]
        decoded = predictor(np.stack([v[0] for v in views]), np.stack([lb.as_array() for lb in boxes]), scaled,
                            any_size=bool(long_side))
        yield from _unbatch(decoded, boxes, owners)


def predict_images(predictor: Predictor, images: Iterable[np.ndarray], long_side: int = 0,
                   records: Optional[Sequence[Optional[ImageRecord]]] = None,
                   batch_size: int = 8) -> List[Prediction]:
    """Predictions for in-memory uint8 RGB images of any sizes, each in its own coordinates.

    Letterboxed exactly as in training (dataset/letterbox.py) to the configured input size, or,
    with ``long_side``, each to its own size (:func:`input_size`; then one image per call), and
    run ``batch_size`` pictures at a time (:func:`iter_predictions` to consume them one by one).
    """
    return list(iter_predictions(predictor, images, long_side, records, batch_size))
