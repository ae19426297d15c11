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
from utils.preemption import PREEMPTED_EXIT_CODE, StopRequest  # noqa: E402


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def run_cli(args, make_strategy=None) -> int:
    """Resolve the config, train, print the summary JSON; clear errors and exit codes.

    ``make_strategy``: a callable returning the tf.distribute strategy (None: one device).
    Exit codes: 0 done, 2 bad input (config, files, data), 3 non-finite training (``--max-bad-steps``
    consecutive skipped steps), 75 stopped by SIGTERM / SIGINT after a checkpoint, or during
    start-up before the first step (run the same command again to resume; ``utils/preemption.py``).
    """
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM / SIGINT are requests to stop from here on, start-up included (TensorFlow's import,
    # the annotations, the model and the restore take a while): the loop stops before its first
    # step when one came during start-up.
    with StopRequest() as stop:
        try:
            cfg = config_from_args(args)
            strategy = make_strategy() if make_strategy else None
            # Imported here, not at the top: distribute_main.py imports this module before it
            # selects GPUs, and TensorFlow (which utils.training imports) must not load before that.
            from utils.training import NonFiniteLossError, Trainer

            try:
                result = Trainer(cfg, strategy=strategy).fit(stop)
            except NonFiniteLossError as e:
                print(f"error: {e}", file=sys.stderr)
                return 3
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(json.dumps(result))
    return PREEMPTED_EXIT_CODE if result.get("preempted") else 0


def main(argv=None) -> int:
    return run_cli(build_parser(__doc__).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
