"""Export a trained SPM model: a SavedModel (image bytes or pixels -> poses), TFLite and ONNX.

    python3 tools/export.py --ckpt runs/tiny_synthetic --out exported/
    python3 tools/export.py --ckpt RUN --out exported/ --flip --scales 1,2 --no-tflite
    python3 tools/export.py --ckpt RUN --out exported/ --onnx      # needs requirements-export.txt

Writes ``OUT/saved_model/`` (signatures ``serving_default``: encoded JPEG/PNG bytes [B] and
``images``: uint8 [B, H, W, 3] -> ``poses`` [B, K, J, 2] in image pixels, ``scores`` [B, K],
``roots`` [B, K, 2], ``num_people`` [B]), ``OUT/spm.tflite`` and with ``--onnx`` ``OUT/spm.onnx``
(each + ``.json`` metadata: a letterboxed float32 [1, H, W, 3] -> poses in network-input pixels).
See utils/export.py and docs/inference.md for the contracts.
"""

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from utils import export, predict  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="run directory or .weights.h5 (config.json beside it)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--config", default=None, help="config.json to build the model from")
    parser.add_argument("--flip", action="store_true", help="flip testing inside the SavedModel")
    parser.add_argument("--scales", default="1", help="multi-scale testing inside the SavedModel, e.g. 0.5,1,2")
    parser.add_argument("--tflite", action=argparse.BooleanOptionalAction, default=True,
                        help="write OUT/spm.tflite (network + decoder, batch 1, run with LiteRT)")
    parser.add_argument("--saved-model", action=argparse.BooleanOptionalAction, default=True,
                        help="write OUT/saved_model (TF Serving; flip and scales inside)")
    parser.add_argument("--onnx", action="store_true",
                        help="also write OUT/spm.onnx (network + decoder, batch 1; needs tf2onnx and onnx: "
                             "pip install -r requirements-export.txt)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    try:
        if args.onnx:
            try:
                import onnx  # noqa: F401
                import tf2onnx  # noqa: F401
            except ImportError as e:
                raise ValueError(f"--onnx needs tf2onnx and onnx ({e}): pip install -r requirements-export.txt") from None
        scales = predict.parse_scales(args.scales)
        model, cfg = predict.load_trained_model(args.ckpt, args.config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {}
    if args.saved_model:
        result["saved_model"] = export.export_saved_model(model, cfg, os.path.join(args.out, "saved_model"),
                                                          flip=args.flip,
                                                          scales=scales)
        print(f"SavedModel: {result['saved_model']}")
    if args.tflite:
        path = os.path.join(args.out, "spm.tflite")
        meta = export.export_tflite(model, cfg, path)
        result.update(tflite=path, tflite_bytes=meta["bytes"], decoder_inside=meta["decoder_inside"])
        print(f"TFLite: {path} ({meta['bytes'] / 1e6:.1f} MB, decoder "
              f"{'inside' if meta['decoder_inside'] else 'beside it: ' + meta.get('decoder_error', '')})")
    if args.onnx:
        path = os.path.join(args.out, "spm.onnx")
        meta = export.export_onnx(model, cfg, path)
        result.update(onnx=path, onnx_bytes=meta["bytes"])
        print(f"ONNX: {path} ({meta['bytes'] / 1e6:.1f} MB, opset {meta['opset']}, decoder inside)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
