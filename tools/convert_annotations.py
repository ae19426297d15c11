"""Convert keypoint annotations between AI Challenger and COCO (``dataset/convert.py``).

    python3 tools/convert_annotations.py --to coco --in keypoint_train_annotations.json \\
        --out aic_train_coco.json --images keypoint_train_images/
    python3 tools/convert_annotations.py --to aic --in person_keypoints_val2017.json --out coco_val_aic.json

``--images`` (AI Challenger -> COCO only) reads each image's width and height from its file
header; without it the sizes are estimated from the annotations, with a warning. The joints both
formats share are kept; AI Challenger's head top and neck, and COCO's face joints, are lost.
"""

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset.convert import aic_to_coco, coco_to_aic  # noqa: E402
from dataset.errors import load_json  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", required=True, choices=("coco", "aic"),
                        help="output format; the input is the other one")
    parser.add_argument("--in", dest="input", required=True, help="input annotation JSON")
    parser.add_argument("--out", required=True, help="output annotation JSON")
    parser.add_argument("--images", default=None,
                        help="image folder (AI Challenger -> COCO): read image sizes from the files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if args.images is not None and args.to != "coco":
        parser.error("--images is only used with --to coco (COCO files carry their image sizes)")
    if args.images is not None and not os.path.isdir(args.images):
        parser.error(f"--images {args.images}: no such folder")
    try:
        data = load_json(args.input)
        source_format = {"coco": "AI Challenger (a JSON list)", "aic": "COCO (a JSON object)"}[args.to]
        if isinstance(data, list) != (args.to == "coco"):
            print(f"error: {args.input}: --to {args.to} reads {source_format}; "
                  f"is the file already in the {args.to} format?", file=sys.stderr)
            return 1
        if args.to == "coco":
            out = aic_to_coco(data, image_dir=args.images, source=args.input)
            what = f"{len(out['images'])} images, {len(out['annotations'])} people"
        else:
            out = coco_to_aic(data, source=args.input)
            what = f"{len(out)} images, {sum(len(e['keypoint_annotations']) for e in out)} people"
    except (ValueError, OSError) as e:   # AnnotationError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    tmp = args.out + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, args.out)
    except OSError as e:
        print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
