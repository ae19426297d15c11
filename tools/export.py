"""Export a trained SPM model: a SavedModel (any uint8 image -> poses) and a TFLite network.

    python3 tools/export.py --ckpt runs/tiny_synthetic --out exported/
    python3 tools/export.py --ckpt RUN --out exported/ --flip --no-tflite

Writes ``OUT/saved_model/`` (signature ``serving_default``: ``image`` uint8 [H, W, 3] ->
``poses`` [K, J, 2] in image pixels, ``scores`` [K], ``roots`` [K, 2], ``num_people``) and
``OUT/spm.tflite`` (+ ``.json`` metadata). See utils/export.py for the contracts.
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
    parser.add_argument("--tflite", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--saved-model", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    try:
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
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
