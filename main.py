"""Train SPM on one device.

    python3 main.py                                   # tiny preset on the built-in synthetic set
    python3 main.py --preset ai_challenger_w32_512 --train-json ... --train-images ... \
                    --val-json ... --val-images ...

Every config field is a flag (``python3 main.py --help``). Training resumes automatically from
the run directory. The last line printed is one JSON object (score, epochs, steps, seconds,
run_dir).
"""

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from config import add_config_args, config_from_args  # noqa: E402


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def run_training(cfg, strategy=None) -> dict:
    """Train with ``strategy`` (None: one device) and return the summary dict."""
    from utils.training import Trainer

    trainer = Trainer(cfg, strategy=strategy)
    return trainer.fit()


def main(argv=None) -> int:
    parser = build_parser(__doc__)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        result = run_training(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from utils.training import NonFiniteLossError

        if isinstance(e, NonFiniteLossError):
            print(f"error: {e}", file=sys.stderr)
            return 3
        raise
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
