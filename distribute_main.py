"""Train SPM on several GPUs (MirroredStrategy) or several machines (MultiWorkerMirroredStrategy).

    python3 distribute_main.py --gpus 2,3 --preset ai_challenger_w32_512 ...   # GPUs 2 and 3
    python3 distribute_main.py --cpu-replicas 2 ...                           # 2 logical CPUs, no GPU
    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                "task": {"type": "worker", "index": 0}}' python3 distribute_main.py ...

``--batch-size`` is per replica: the global batch is batch_size x replicas, and losses are
normalised by the global batch. With TF_CONFIG only the chief (worker 0) writes checkpoints,
summaries and pictures. Other flags are those of main.py.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from main import build_parser, run_cli  # noqa: E402  (no TensorFlow import yet)
from utils.distribute import select_gpus  # noqa: E402


def main(argv=None) -> int:
    parser = build_parser(__doc__)
    parser.add_argument("--gpus", default="", help="physical GPU ids to use, e.g. 2,3 (default: all)")
    parser.add_argument("--cpu-replicas", type=int, default=0,
                        help="run N logical CPU replicas (testing without a GPU)")
    args = parser.parse_args(argv)
    if args.gpus:
        # Before TensorFlow is imported: CUDA reads the variable once, at initialisation.
        try:
            selected = select_gpus(args.gpus)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"using GPUs {selected} (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})",
              file=sys.stderr)

    def strategy():
        # TensorFlow loads here, after --gpus has set CUDA_VISIBLE_DEVICES (it reads it once).
        from utils.distribute import make_strategy

        s = make_strategy(cpu_replicas=args.cpu_replicas)
        logging.info("%s with %d replicas", type(s).__name__, s.num_replicas_in_sync)
        return s

    return run_cli(args, strategy)


if __name__ == "__main__":
    sys.exit(main())
