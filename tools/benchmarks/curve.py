"""``python3 tools/benchmark.py curve``: the training loss, step by step, of the tiny preset.

Trains ``--steps`` steps of a preset (default ``tiny_synthetic``, the default run's) from a fixed
initial weights file (``--init``, written by the first call: the same start for every run) with
``deterministic`` data order and seeds, and prints the mean losses of every ``--every`` steps.
No evaluation. It imports only ``config`` and ``utils.training``, whose interfaces it uses
(``Trainer``, ``run_steps``) predate the on-device targets, so the same file runs against an
older checkout to compare the two input paths on the same seed:

    python3 tools/benchmark.py curve --init /tmp/init.weights.h5 --out new.json
    PYTHONPATH=/path/to/old/checkout python3 tools/benchmarks/curve.py --init /tmp/init.weights.h5 --out old.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List


def run_benchmark(name: str, argv: List[str]) -> Dict:
    parser = argparse.ArgumentParser(prog=f"benchmark.py {name}", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", default="tiny_synthetic")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", required=True, help="initial weights (.weights.h5); written when missing")
    parser.add_argument("--out", default="", help="also write the result here (json)")
    args = parser.parse_args(argv)

    # Imported here, after sys.path may point at another checkout (see the module docstring).
    import keras  # noqa: E402  (with the checkout's TensorFlow setup)
    from config import get_preset  # noqa: E402  (the checkout's config)
    from nets.spm_model import build_spm_model  # noqa: E402  (the checkout's model)
    from utils.training import Trainer  # noqa: E402  (the checkout's training loop)

    run_dir = tempfile.mkdtemp(prefix="spm_curve_")
    cfg = get_preset(args.preset).replace(run_dir=run_dir, deterministic=True, seed=args.seed,
                                          steps_per_epoch=args.steps, epochs=1)
    if not os.path.exists(args.init):
        keras.utils.set_random_seed(args.seed)
        build_spm_model(cfg).save_weights(args.init)
    cfg = cfg.replace(finetune=args.init)
    trainer = Trainer(cfg, evaluate_fn=lambda model, c: {"score": 0.0})
    iterator = iter(trainer.dist_dataset)
    rows, start = [], time.perf_counter()
    for k in range(args.steps // args.every):
        out = trainer.run_steps(iterator, args.every)
        rows.append({"step": (k + 1) * args.every, "total": out["total"], "root": out["root"], "disp": out["disp"]})
        print(f"step {rows[-1]['step']:4d}  total {out['total']:.4f}  root {out['root']:.4f}  disp {out['disp']:.4f}",
              flush=True)
    del iterator
    result = {"benchmark": "curve", "preset": args.preset, "steps": args.steps, "every": args.every,
              "seconds": round(time.perf_counter() - start, 1), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    if os.environ.get("PYTHONPATH"):
        sys.path.insert(0, os.environ["PYTHONPATH"].split(os.pathsep)[0])
    print(json.dumps(run_benchmark("curve", sys.argv[1:])))
