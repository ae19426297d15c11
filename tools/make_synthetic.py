"""Generate the synthetic multi-person data set (dataset/synthetic.py) into a folder.

    python3 tools/make_synthetic.py --out data/synthetic --train 2000 --val 200 --seed 0

Writes ``train/`` and ``val/`` JPEGs, ``train.json`` / ``val.json`` (AI Challenger format) and
``train_coco.json`` / ``val_coco.json`` (COCO format). ``main.py`` does not need this: it
generates its default data set into a cache folder on first use.
"""

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset.synthetic import generate_synthetic_dataset  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    parser.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=int, default=0,
                        help="rendering threads; 0 = one per core (the output does not depend on it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.time()
    try:
        paths = generate_synthetic_dataset(args.out, args.train, args.val, args.seed, args.workers)
    except (ValueError, OSError) as e:
        print(f"make_synthetic: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out": os.path.abspath(paths.root), "train": args.train, "val": args.val,
                      "seed": args.seed, "seconds": round(time.time() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
