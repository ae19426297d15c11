"""The official AI Challenger 2017 keypoint score of a submission (``utils/aic_eval.py``).

    python3 tools/ai_format_kps_eval.py --ref keypoint_validation_annotations.json \\
        --submit predictions.json

Prints the warnings (one per line, the first ``--max-warnings``) and, as its last line,
``Score: 0.xxxxxxxx``. A malformed file exits with status 1 and one line naming the file, the
image and the person.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset.errors import AnnotationError  # noqa: E402
from utils.aic_eval import evaluate_files, format_warnings  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", required=True, help="annotation JSON (AI Challenger format)")
    parser.add_argument("--submit", required=True, help="prediction JSON (AI Challenger submission format)")
    parser.add_argument("--max-warnings", type=int, default=20,
                        help="print at most this many warnings (default 20; -1 = all)")
    args = parser.parse_args(argv)

    start = time.time()
    try:
        result = evaluate_files(args.ref, args.submit)
    except AnnotationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Reference: {result.num_images} images, {result.num_people} people ({args.ref})")
    print(f"Evaluated in {time.time() - start:.2f} seconds: {result.num_missing_images} images "
          f"without prediction, {result.num_extra_images} predicted images not in the reference, "
          f"denominator {result.denominator}")
    if result.warnings:
        print(f"Warnings ({len(result.warnings)}):")
        limit = None if args.max_warnings < 0 else args.max_warnings
        for line in format_warnings(result.warnings, limit):
            print(f"  {line}")
    print("Score: %.8f" % result.score)
    return 0


if __name__ == "__main__":
    sys.exit(main())
