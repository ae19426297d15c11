"""Predict: rebuild a trained model from its run directory and turn images into poses.

One path serves the training loop's evaluation (``utils/evaluation.py``), ``tools/model_val.py``,
``tools/spm_model_test.py``, the ``infer`` benchmark and the exported model (``utils/export.py``):

    model, cfg = load_trained_model(run_dir)              # config.json + weights
    predictor = Predictor(model, cfg, flip=False)         # network + in-graph SPR decoder
    predictions, _ = predict_records(predictor, records)  # poses in original image coordinates
    predictions = predict_images(predictor, images)       # in-memory images of any size

Flip testing (``flip=True``, :func:`network_maps`) runs the network on the image and on its
mirror, mirrors the second maps back (left and right channels swapped, x displacements negated:
``nets.spr.flip_maps``), averages the maps, and decodes once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from config import CONFIG_FILENAME, Config, load_config
from config.skeletons import Skeleton
from dataset.letterbox import letterbox_image, letterbox_params, to_original
from dataset.pipeline import InputPipeline
from dataset.records import ImageRecord
from nets.spm_model import build_spm_model
from nets.spr import flip_maps, make_decoder

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
    if overrides:
        cfg = cfg.replace(**overrides)
    model = build_spm_model(cfg)
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

def network_maps(model, images, skeleton: Skeleton, flip: bool = False):
    """float32 ``(root, disp)`` maps of a letterboxed batch; with ``flip`` the average of the
    maps of the images and of their mirrors (mirrored back). The one flip averaging of the
    repository: the predictor and the exported model both call it."""
    out = model(images, training=False)
    root, disp = tf.cast(out["root"], tf.float32), tf.cast(out["disp"], tf.float32)
    if flip:
        out_f = model(tf.reverse(images, axis=[2]), training=False)
        root_f, disp_f = flip_maps(tf.cast(out_f["root"], tf.float32), tf.cast(out_f["disp"], tf.float32),
                                   skeleton)
        root, disp = (root + root_f) / 2.0, (disp + disp_f) / 2.0
    return root, disp


class Predictor:
    """Network + SPR decoder in one graph: float32 images [B, H, W, 3] (0..255, letterboxed) ->
    poses [B, K, J, 2] (network-input pixels), scores [B, K], num_people [B]."""

    def __init__(self, model, cfg: Config, flip: bool = False):
        self.model, self.cfg, self.flip = model, cfg, flip
        h, w = cfg.data.input_height, cfg.data.input_width
        self.maps = tf.function(lambda images: network_maps(model, images, cfg.skeleton, flip),
                                input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32)])
        # The decoder alone is compiled with XLA (about 2.5x faster on CPU, nets/spr.py); the
        # network is left to the regular graph.
        self.decode = make_decoder(cfg.skeleton, cfg.spr, cfg.output_shape, jit_compile=True)

    def __call__(self, images):
        """:class:`nets.spr.Decoded` of a float32 batch [B, H, W, 3] (0..255, letterboxed)."""
        return self.decode(*self.maps(images))


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
                    progress: bool = False) -> Tuple[List[Prediction], InputPipeline]:
    """Predict every record's image with the evaluation pipeline (decode + letterbox in parallel).

    Returns ``(predictions, pipeline)``; images that cannot be read are skipped with a warning and
    counted in ``pipeline.skipped`` (they get no prediction).
    """
    pipeline = InputPipeline(predictor.cfg, "val", records)
    dataset = pipeline.eval_dataset(batch_size)
    bar = keras.utils.Progbar(len(records), unit_name="image") if progress else None
    out: List[Prediction] = []
    done = 0
    for images, info in dataset:
        out.extend(_unbatch(predictor(images), info["letterbox"].numpy(),
                            [pipeline.records[int(i)] for i in info["index"].numpy()]))
        done += len(images)
        if bar is not None:
            bar.update(done)
    return out, pipeline


def predict_images(predictor: Predictor, images: Sequence[np.ndarray]) -> List[Prediction]:
    """Predictions for in-memory uint8 RGB images of any sizes, each in its own coordinates.

    Letterboxed exactly as in training (dataset/letterbox.py)."""
    cfg = predictor.cfg
    h, w = cfg.data.input_height, cfg.data.input_width
    boxes = [letterbox_params(im.shape[0], im.shape[1], h, w) for im in images]
    batch = np.stack([letterbox_image(im, lb) for im, lb in zip(images, boxes)]).astype(np.float32)
    return _unbatch(predictor(batch), boxes, [None] * len(images))
