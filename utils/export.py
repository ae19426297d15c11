"""Exports: a SavedModel that goes from image bytes or pixels to poses, and a TFLite network.

SavedModel, two batched signatures, each returning ``poses`` float32 ``[B, K, J, 2]`` (each
image's own pixels), ``scores`` float32 ``[B, K]``, ``roots`` float32 ``[B, K, 2]`` and
``num_people`` int32 ``[B]`` (``K = max_people``; the first ``num_people`` slots of an image hold
its people by decreasing score, the rest are zeros):

* ``serving_default``: ``images`` string ``[B]``, encoded JPEG or PNG bytes of any sizes (what a
  server receives; TF Serving's REST API takes them as ``{"b64": ...}``), decoded as the Python
  tools decode a photo (EXIF orientation applied, ``dataset.exif``), poses in those pixels;
* ``images``: ``images`` uint8 ``[B, H, W, 3]`` RGB, one size per batch.

Per image the letterbox (``dataset.letterbox.letterbox_tf``, the geometry of training; with
multi-scale testing one per scale, each from the original picture), then for
the batch the network (with flip and scale averaging when exported so,
``utils.predict.network_maps``), the SPR decoder with the training Z, and the mapping back to the
image all run inside the graph.

ONNX (:func:`export_onnx`, tf2onnx; run with onnxruntime) and TFLite (run with LiteRT,
``ai_edge_litert``): the network and the decoder on a letterboxed float32 ``[1, H, W, 3]`` image (0..255),
returning poses in network-input pixels; the letterbox stays outside (TFLite has no
anti-aliased resize), done with ``dataset.letterbox`` exactly as the Python path does. When the
decoder cannot be converted, the file holds the network alone (``root``, ``disp``, and
``heatmaps`` for a model trained with ``--joint-heatmaps``) and
``decoder_inside`` in the metadata JSON says so.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Sequence

import keras
import tensorflow as tf

from config import Config
from dataset.exif import decode_photo
from dataset.letterbox import letterbox_tf
from nets.spr import decode
from utils.predict import network_maps, scaled_input_size

SIGNATURE = "serving_default"     # encoded image bytes
IMAGES_SIGNATURE = "images"       # uint8 pixels


def build_serving_module(model, cfg: Config, flip: bool = False, scales: Sequence[float] = (1.0,)):
    """A tf.Module with the two exported signatures (module docstring) as ``serve_encoded`` and
    ``serve_images``."""
    skeleton, spr = cfg.skeleton, cfg.spr
    H, W = cfg.data.input_height, cfg.data.input_width
    scales = tuple(float(s) for s in scales)

    sizes = [scaled_input_size(H, W, s) for s in scales if s != 1.0]
    # one picture -> its scale-1 letterbox, then each other scale's, all from the original
    signature = (tf.TensorSpec([H, W, 3], tf.float32), tf.TensorSpec([4], tf.float32),
                 tuple(tf.TensorSpec([h, w, 3], tf.float32) for h, w in sizes),
                 tuple(tf.TensorSpec([4], tf.float32) for _ in sizes))

    def letterboxed(one):
        x, params = letterbox_tf(one, H, W)
        others = [letterbox_tf(one, h, w) for h, w in sizes]
        return x, params, tuple(o[0] for o in others), tuple(o[1] for o in others)

    class SpmServing(tf.Module):
        def __init__(self):
            super().__init__(name="spm_serving")
            self.model = model

        def _poses(self, x, params, scaled_x, scaled_params):
            """Network and decoder on a letterboxed batch; poses mapped back per image."""
            maps = network_maps(self.model, x, skeleton, flip, scales, params,
                                list(zip(scaled_x, scaled_params)))     # root, disp[, heatmaps]
            dec = decode(maps[0], maps[1], skeleton, spr, *maps[2:])
            scale, pad = params[:, None, None, :2], params[:, None, None, 2:]
            valid = tf.sequence_mask(dec.num_people, spr.max_people)
            poses = tf.where(valid[:, :, None, None], (dec.poses - pad) / scale, 0.0)
            roots = tf.where(valid[:, :, None], (dec.roots - pad[:, 0]) / scale[:, 0], 0.0)
            return {"poses": poses, "scores": dec.scores, "roots": roots, "num_people": dec.num_people}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def serve_encoded(self, images):
            def one(data):
                # decoded as the Python tools decode a photo (dataset.exif: EXIF orientation applied)
                image = decode_photo(data)
                tf.debugging.assert_positive(tf.size(image), message="empty image")
                return letterboxed(image)

            return self._poses(*tf.map_fn(one, images, fn_output_signature=signature))

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
        def serve_images(self, images):
            tf.debugging.assert_positive(tf.size(images), message="empty images")
            return self._poses(*tf.map_fn(letterboxed, images, fn_output_signature=signature))

    return SpmServing()


def export_saved_model(model, cfg: Config, out_dir: str, flip: bool = False,
                       scales: Sequence[float] = (1.0,)) -> str:
    module = build_serving_module(model, cfg, flip, scales)
    tf.saved_model.save(module, out_dir, signatures={SIGNATURE: module.serve_encoded,
                                                     IMAGES_SIGNATURE: module.serve_images})
    cfg.save(out_dir)
    return out_dir


def tflite_interpreter(path: str):
    """An allocated interpreter of a ``.tflite`` file: LiteRT's (``ai_edge_litert``, the
    replacement of ``tf.lite.Interpreter``, which TF 2.21 marks for deletion) when installed
    (requirements-export.txt), TensorFlow's otherwise."""
    try:
        from ai_edge_litert.interpreter import Interpreter     # optional (requirements-export.txt)
    except ImportError:
        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_path=path)
    interpreter.allocate_tensors()
    return interpreter


def export_tflite(model, cfg: Config, path: str) -> Dict[str, object]:
    """Write ``path`` (.tflite) and ``path + '.json'`` (metadata); returns the metadata."""
    H, W = cfg.data.input_height, cfg.data.input_width

    class SprDecode(keras.layers.Layer):
        """The in-graph SPR decoder as a layer, so the whole Keras model converts."""

        def call(self, root, disp, heatmaps=None):
            dec = decode(tf.cast(root, tf.float32), tf.cast(disp, tf.float32), cfg.skeleton, cfg.spr,
                         None if heatmaps is None else tf.cast(heatmaps, tf.float32))
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
        blob = convert(keras.Model(images, SprDecode(name="spr_decode")(maps["root"], maps["disp"],
                                                                         maps.get("heatmaps"))))
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


ONNX_OUTPUTS = ("poses", "scores", "roots", "num_people")


def export_onnx(model, cfg: Config, path: str, opset: int = 17) -> Dict[str, object]:
    """Write ``path`` (.onnx, tf2onnx) and ``path + '.json'`` (metadata); returns the metadata.

    The network and the SPR decoder in one graph, as the TFLite file: a letterboxed float32
    ``images`` [1, H, W, 3] (0..255, ``dataset.letterbox``) -> ``poses`` [1, K, J, 2] in
    network-input pixels, ``scores`` [1, K], ``roots`` [1, K, 2], ``num_people`` [1], and the
    maps they were decoded from (``root``, ``disp``, and ``heatmaps`` for a model trained with
    ``--joint-heatmaps``) for users who decode or average them themselves. The weights are
    frozen into constants first (tf2onnx reads a Keras 3 model's variables as missing inputs
    otherwise)."""
    import onnx                # optional (requirements-export.txt): imported only for --onnx
    import tf2onnx             # likewise
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2  # TF-internal: only here

    H, W = cfg.data.input_height, cfg.data.input_width
    spec = [tf.TensorSpec([1, H, W, 3], tf.float32, name="images")]
    map_names = ("root", "disp") + (("heatmaps",) if cfg.model.joint_heatmaps else ())
    names = ONNX_OUTPUTS + map_names

    @tf.function(input_signature=spec)
    def outputs(images):
        maps = {k: tf.cast(v, tf.float32) for k, v in model(images, training=False).items()}
        dec = decode(maps["root"], maps["disp"], cfg.skeleton, cfg.spr, maps.get("heatmaps"))
        return [dec.poses, dec.scores, dec.roots, dec.num_people] + [maps[k] for k in map_names]

    frozen = convert_variables_to_constants_v2(outputs.get_concrete_function())
    proto, _ = tf2onnx.convert.from_graph_def(
        frozen.graph.as_graph_def(), input_names=[t.name for t in frozen.inputs],
        output_names=[t.name for t in frozen.outputs], opset=opset)
    # tf2onnx keeps TensorFlow's tensor names (images:0, Identity_2:0): give them the contract's
    renames = {proto.graph.input[0].name: "images"}
    renames.update({out.name: name for out, name in zip(proto.graph.output, names)})
    for node in proto.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.name = renames.get(value.name, value.name)
    onnx.checker.check_model(proto)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save(proto, path)
    meta: Dict[str, object] = {
        "input": [1, H, W, 3], "input_dtype": "float32 RGB 0..255, letterboxed", "skeleton": cfg.data.skeleton,
        "output_stride": cfg.spr.output_stride, "opset": opset, "decoder_inside": True,
        "outputs": "poses [1,K,J,2] network-input pixels, scores [1,K], roots [1,K,2], num_people [1]; "
                   "the maps root [1,h,w,1], disp [1,h,w,2J]" + (", heatmaps [1,h,w,J]" if cfg.model.joint_heatmaps else "")}
    with open(path + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    meta["bytes"] = os.path.getsize(path)
    return meta
