"""Plot a run's score and losses per epoch from its ``history.json``.

    python3 tools/plot_history.py --run runs/tiny_synthetic --out tools/figures/main_curve.png

Left: the validation score (AI Challenger score, or COCO AP), AP@0.5 and AP@0.75 at every
evaluated epoch; right: the mean training losses of every epoch (root, displacements and, for
``--joint-heatmaps`` runs, joints). The curve picture of docs/training.md is made with it.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import load_config  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--run", required=True, help="a run directory (history.json, config.json)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--title", default="", help="default: the preset and the run's last score")
    args = parser.parse_args(argv)
    path = os.path.join(args.run, "history.json")
    try:
        with open(path) as f:
            history = json.load(f)
    except FileNotFoundError:
        print(f"error: {path}: no history (train a run first)", file=sys.stderr)
        return 2
    except json.JSONDecodeError as e:
        print(f"error: {path}: not valid JSON ({e})", file=sys.stderr)
        return 2
    if not isinstance(history, list) or not history:
        print(f"error: {path}: no epoch recorded", file=sys.stderr)
        return 2
    cfg = load_config(args.run)

    import matplotlib  # noqa: E402  (loaded after the argument checks; the backend is set before pyplot)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)
    from matplotlib.ticker import MaxNLocator  # noqa: E402  (likewise)

    scored = [h for h in history if "score" in h]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    metric = "COCO AP" if cfg.data.dataset == "coco" else "AI Challenger score"
    for key, label, style in (("score", metric, "o-"), ("ap50", "AP@0.5", "s--"), ("ap75", "AP@0.75", "^:")):
        points = [(h["epoch"], h[key]) for h in scored if key in h]
        if points:
            left.plot(*zip(*points), style, label=label)
    left.set_xlabel("epoch")
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    losses = (("loss_root", f"root ({cfg.loss.root_loss})"), ("loss_disp", f"disp ({cfg.loss.disp_loss})"),
              ("loss_joints", f"joints ({cfg.loss.joint_loss})"))
    for key, label in losses:
        points = [(h["epoch"], h[key]) for h in history if key in h]
        if points:
            right.plot(*zip(*points), "o-", label=label)
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("epoch")
    right.set_yscale("log")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    last = scored[-1]["score"] if scored else float("nan")
    fig.suptitle(args.title or f"{cfg.preset}: {metric} {last:.4f} after {history[-1]['step']} steps", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(json.dumps({"out": args.out, "epochs": len(history), "score": last}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
