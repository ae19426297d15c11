"""Exports: a SavedModel that goes from any uint8 image to poses, and a TFLite network.

SavedModel (``serving_default``): ``image`` uint8 ``[H, W, 3]`` RGB of any size ->
``poses`` float32 ``[K, J, 2]`` (original image pixels), ``scores`` float32 ``[K]``, ``roots``
float32 ``[K, 2]`` and ``num_people`` int32 ``[]``. The letterbox (``dataset.letterbox.letterbox_tf``,
the same geometry as training), the network, the SPR decoder and the mapping back to the image
all run inside the graph; the first ``num_people`` slots hold the people, by decreasing score.

TFLite: the network and the decoder on a letterboxed float32 ``[1, H, W, 3]`` image (0..255),
returning poses in network-input pixels; the letterbox stays outside (TFLite has no
anti-aliased resize), done with ``dataset.letterbox`` exactly as the Python path does. When the
decoder cannot be converted, the file holds the network alone (``root``, ``disp``) and
``decoder_inside`` in the metadata JSON says so.
"""

from __future__ import annotations

import json
import os
from typing import Dict

import keras
import tensorflow as tf

from config import Config
from dataset.letterbox import letterbox_tf
from nets.spr import decode
from utils.predict import network_maps

SIGNATURE = "serving_default"


def build_serving_module(model, cfg: Config, flip: bool = False):
    """A tf.Module whose ``serve(image)`` is the exported signature (module docstring)."""
    skeleton, spr = cfg.skeleton, cfg.spr
    H, W = cfg.data.input_height, cfg.data.input_width

    class SpmServing(tf.Module):
        def __init__(self):
            super().__init__(name="spm_serving")
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="image")])
        def serve(self, image):
            tf.debugging.assert_positive(tf.size(image), message="empty image")
            x, params = letterbox_tf(image, H, W)
            root, disp = network_maps(self.model, x[None], skeleton, flip)
            dec = decode(root, disp, skeleton, spr)
            scale, pad = params[:2], params[2:]
            valid = tf.sequence_mask(dec.num_people, spr.max_people)[0]
            poses = tf.where(valid[:, None, None], (dec.poses[0] - pad) / scale, 0.0)
            roots = tf.where(valid[:, None], (dec.roots[0] - pad) / scale, 0.0)
            return {"poses": poses, "scores": dec.scores[0], "roots": roots,
                    "num_people": dec.num_people[0]}

    return SpmServing()


def export_saved_model(model, cfg: Config, out_dir: str, flip: bool = False) -> str:
    module = build_serving_module(model, cfg, flip)
    tf.saved_model.save(module, out_dir, signatures={SIGNATURE: module.serve})
    cfg.save(out_dir)
    return out_dir


def export_tflite(model, cfg: Config, path: str) -> Dict[str, object]:
    """Write ``path`` (.tflite) and ``path + '.json'`` (metadata); returns the metadata."""
    H, W = cfg.data.input_height, cfg.data.input_width

    class SprDecode(keras.layers.Layer):
        """The in-graph SPR decoder as a layer, so the whole Keras model converts."""

        def call(self, root, disp):
            dec = decode(tf.cast(root, tf.float32), tf.cast(disp, tf.float32), cfg.skeleton, cfg.spr)
            return {"poses": dec.poses, "scores": dec.scores, "roots": dec.roots,
                    "num_people": dec.num_people}

    def convert(keras_model):
        # from_keras_model freezes the weights; converting a tf.function that closes over a
        # Keras 3 model keeps resource variables, which the TFLite runtime reads as garbage.
        return tf.lite.TFLiteConverter.from_keras_model(keras_model).convert()

    meta: Dict[str, object] = {"input": [1, H, W, 3], "input_dtype": "float32 RGB 0..255, letterboxed",
                               "skeleton": cfg.data.skeleton, "output_stride": cfg.spr.output_stride}
    images = keras.Input((H, W, 3), batch_size=1, name="image")
    maps = model(images)
    try:
        blob = convert(keras.Model(images, SprDecode(name="spr_decode")(maps["root"], maps["disp"])))
        meta["decoder_inside"] = True
        meta["outputs"] = "poses [1,K,J,2] network-input pixels, scores [1,K], roots [1,K,2], num_people [1]"
    except Exception as e:  # the converter raises several internal error types
        blob = convert(keras.Model(images, maps))
        meta["decoder_inside"] = False
        meta["decoder_error"] = str(e).strip().splitlines()[0][:300]
        meta["outputs"] = "root [1,h,w,1], disp [1,h,w,2J]; decode them with nets.spr.decode"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(blob)
    with open(path + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    meta["bytes"] = len(blob)
    return meta
