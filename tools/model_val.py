"""Predict poses for an annotated image set and score them with the official metric.

    python3 tools/model_val.py --ckpt runs/tiny_synthetic --json val.json --images val_images/
    python3 tools/model_val.py --ckpt RUN --json person_keypoints_val2017.json --images val2017/ --format coco

``--ckpt`` is a run directory (its config.json rebuilds the model) or a ``.weights.h5`` file with
a config.json beside it. AI Challenger json in: AI Challenger predictions out, and the official
AI Challenger score when the annotations hold keypoints. COCO json in: COCO results out, and the
pycocotools COCOeval AP table. ``--flip`` averages the maps of the image and of its mirror,
``--scales 0.5,1,2`` the maps of the rescaled inputs; ``--long-side N`` runs each image at its own
input size (aspect ratio kept, long side N, padded to a multiple of 32) instead of the training
square.
The last line is one JSON object.
"""

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from config.skeletons import COCO, SKELETONS  # noqa: E402
from dataset.ai_challenger import ai_challenger_records  # noqa: E402
from dataset.coco import coco_records, person_category  # noqa: E402
from dataset.errors import AnnotationError, load_json  # noqa: E402
from utils import evaluation, predict  # noqa: E402


def detect_format(data) -> str:
    if isinstance(data, list):
        return "aic"
    if isinstance(data, dict) and "images" in data:
        return "coco"
    raise ValueError("the annotation file is neither AI Challenger (a list) nor COCO (an object with 'images')")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="run directory or .weights.h5 (config.json beside it)")
    parser.add_argument("--json", required=True, help="annotation file (AI Challenger or COCO)")
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--format", choices=("aic", "coco"), default=None, help="default: from the json")
    parser.add_argument("--out", default=None, help="where to write the predictions json")
    parser.add_argument("--flip", action="store_true", help="flip testing")
    parser.add_argument("--scales", default="1", help="multi-scale testing, e.g. 0.5,1,2 (default 1)")
    parser.add_argument("--long-side", type=int, default=0,
                        help="each image at its own input size with this long side (multiple of 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="pictures per network call (default 8)")
    parser.add_argument("--strict-annotations", action="store_true",
                        help="a person with bad values is an error (default: left out, counted, logged)")
    parser.add_argument("--config", default=None, help="config.json to build the model from (default: the run's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        data = load_json(args.json)
        fmt = args.format or detect_format(data)
        if not os.path.isdir(args.images):
            raise FileNotFoundError(f"{args.images}: no such image folder")
        model, cfg = predict.load_trained_model(args.ckpt, args.config,
                                                  expect_skeleton="ai_challenger" if fmt == "aic" else None)
        if fmt == "coco":
            # the file's joints (its category's names; COCO's 17 when it names none) against the model's
            try:
                names = tuple(person_category(data, args.json)["keypoints"])
            except AnnotationError:                      # no category names joints
                names = COCO.joint_names
            if names != cfg.skeleton.joint_names:
                label = next((k for k, v in SKELETONS.items() if v.joint_names == names), f"{len(names)}-joint")
                raise ValueError(f"{args.ckpt} is a model of the {cfg.skeleton.name} skeleton "
                                 f"({cfg.skeleton.num_joints} joints, preset {cfg.preset}); these annotations "
                                 f"need the {label} skeleton")
        if fmt == "aic":
            records, stats = ai_challenger_records(data, args.json, args.images, strict=args.strict_annotations)
        else:
            records, stats = coco_records(data, args.json, args.images, cfg.skeleton, strict=args.strict_annotations)
        if not records:
            raise ValueError(f"{args.json}: no images to predict")
        cfg = cfg.replace(dataset="ai_challenger" if fmt == "aic" else "coco")
        if args.long_side:
            predict.input_size(1, 1, args.long_side)             # validates the value
        predictor = predict.Predictor(model, cfg, flip=args.flip, scales=predict.parse_scales(args.scales))
        start = time.time()
        predictions, pipeline = predict.predict_records(predictor, records, args.batch_size, progress=True,
                                                        long_side=args.long_side)
        seconds = time.time() - start
    except (AnnotationError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if pipeline.skipped.count:
        print(f"warning: {pipeline.skipped.summary()}", file=sys.stderr)
    out_records = evaluation.aic_predictions(predictions) if fmt == "aic" else evaluation.coco_predictions(predictions)
    out = args.out or os.path.join(os.getcwd(), f"predictions_{fmt}.json")
    with open(out, "w") as f:
        json.dump(out_records, f)
    result = {"predictions": os.path.abspath(out), "images": len(records),
              "predicted_images": len(predictions), "skipped_images": pipeline.skipped.count,
              "images_per_s": round(len(predictions) / max(seconds, 1e-9), 2), "flip": args.flip,
              "scales": list(predictor.scales), "long_side": args.long_side}
    print(f"{len(predictions)} images in {seconds:.1f} s ({result['images_per_s']} images/s); "
          f"predictions written to {out}")
    if sum(r.num_people for r in records):
        ids = [r.image_id for r in records]
        if fmt == "aic":
            scored = evaluation.score_aic(args.json, predictions, ids)
            print(f"AI Challenger score: {scored['score']:.8f}")
        else:
            scored = evaluation.score_coco(args.json, predictions, ids, verbose=True, oks_sigmas=cfg.skeleton.oks_sigmas)
        result.update(scored)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
