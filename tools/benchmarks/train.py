"""``python3 tools/benchmark.py train``: ms per training step with 1 and with N steps per call.

    python3 tools/benchmark.py train [--preset tiny_synthetic] [--steps 40] [--steps-per-call 1,10]

One ``Trainer`` on the preset's real input pipeline (synthetic data, generated on first use),
in a scratch run directory; after a warm-up call, ``--steps`` steps are timed for each value of
``--steps-per-call``, in the same process, alternating the values twice (the order cancels
drifts of the machine). A call is one ``tf.function`` call of ``Trainer.run_steps``: the
steps, the summed losses and one host read of the results.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from typing import Dict, List

from config import get_preset
from utils.training import Trainer


def run_benchmark(name: str, argv: List[str]) -> Dict:
    parser = argparse.ArgumentParser(prog=f"benchmark.py {name}", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", default="tiny_synthetic")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement (default 40)")
    parser.add_argument("--steps-per-call", default="1,10", help="comma-separated values (default 1,10)")
    parser.add_argument("--batch-size", type=int, default=0, help="per-replica batch (default: the preset's)")
    args = parser.parse_args(argv)
    values = [int(v) for v in args.steps_per_call.split(",")]
    if any(v < 1 or args.steps % v for v in values):
        raise SystemExit(f"--steps {args.steps} must be a multiple of every --steps-per-call value {values}")
    cfg = get_preset(args.preset).replace(dataset="synthetic", skeleton="ai_challenger",
                                          run_dir=tempfile.mkdtemp(prefix="spm_train_bench_"))
    if args.batch_size:
        cfg = cfg.replace(batch_size=args.batch_size)
    trainer = Trainer(cfg, evaluate_fn=lambda model, cfg: {"score": 0.0})
    iterator = iter(trainer.dist_dataset)
    for v in values:                                 # warm-up: trace, thread pools, first batches
        trainer.run_steps(iterator, v)
    times: Dict[int, List[float]] = {v: [] for v in values}
    for _ in range(2):
        for v in values:
            start = time.perf_counter()
            for _ in range(args.steps // v):
                trainer.run_steps(iterator, v)
            times[v].append(1000.0 * (time.perf_counter() - start) / args.steps)
    del iterator
    gc.collect()
    result = {"benchmark": "train", "preset": args.preset, "backbone": cfg.model.backbone,
              "input": f"{cfg.data.input_width}x{cfg.data.input_height}", "batch_size": cfg.data.batch_size,
              "steps": args.steps, "cores": os.cpu_count(),
              "ms_per_step": {str(v): round(statistics.mean(t), 1) for v, t in times.items()},
              "ms_per_step_runs": {str(v): [round(x, 1) for x in t] for v, t in times.items()}}
    print("ms per step: " + ", ".join(f"{v} step(s) per call {result['ms_per_step'][str(v)]}" for v in values))
    return result
