"""``python3 tools/benchmark.py recipe``: rehearse a preset's recipe at its own geometry.

    python3 tools/benchmark.py recipe                       # ai_challenger_w32_512, the variants below
    python3 tools/benchmark.py recipe --preset coco_w32_512 --steps 800 --only paper,default
    python3 tools/benchmark.py recipe --variants "mine:disp_loss_weight=0.3,lr=5e-4" --out recipe.json

Nothing shows that a 512 preset learns until days of GPU time have passed. This trains, for each
variant, a small trunk (``hrnet_tiny`` and the tiny preset's head unless ``--backbone``/``--head-*``
say otherwise) **at the preset's input size, with its SPR settings (sigma, tau, anchor, root
type), loss, augmentation and learning-rate schedule**, on the built-in synthetic set, for a
fixed number of steps, and scores it with the training loop's own evaluator (the official AI
Challenger score, AP@0.5, AP@0.75) at ``--evals`` points of the run: the score curve.

The run is mapped onto 10 "epochs" of ``steps / 10`` steps, so a step schedule keeps the preset's
shape (decays at the same fractions of the run: 90 and 120 of 150 epochs -> epochs 6 and 8);
the cosine variants warm up for 5% of the steps. Every variant starts from the same seed, reads
the same deterministic batches and is scored on the same validation images (a fixed subset of
``--val-images`` at the intermediate points, all 200 at the end).

A variant is ``name:field=value,field=value`` over config fields (the command-line flags'
names with ``_``); ``name:`` alone is the preset as it is. The default set: the preset with two
seeds (a difference between variants is called only when it exceeds their spread), the paper's
recipe (displacement weight 0.01, L2 root loss, no heatmaps, step schedule), the former preset
(step schedule, no heatmaps), each of those two changes alone, and the displacement loss
normalised per person (``disp_loss_norm=person``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any, Dict, List, Tuple

from config import get_preset

DEFAULT_VARIANTS = (
    # The preset as it is, twice (seeds 0 and 1: their spread is the noise a difference must beat),
    # then one change each, spelled out so that the set does not move with the preset's defaults.
    "preset:",
    "preset_seed1:seed=1",
    "paper:disp_loss_weight=0.01,root_loss=l2,joint_heatmaps=false,lr_schedule=step,warmup_steps=0",
    "step_no_heatmaps:joint_heatmaps=false,lr_schedule=step,warmup_steps=0",
    "no_heatmaps:joint_heatmaps=false",
    "step:lr_schedule=step,warmup_steps=0",
    "person:disp_loss_norm=person",
)
EPOCHS = 10


def parse_variant(text: str) -> Tuple[str, Dict[str, str]]:
    """``name:field=value,...`` -> (name, {field: value}); a clear error for anything else."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variants: {text!r} is not name:field=value,...")
    fields: Dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--variants: {item!r} in {text!r} is not field=value")
        fields[key.strip().replace("-", "_")] = value.strip()
    return name, fields


def variant_config(preset: str, fields: Dict[str, str], args, run_dir: str):
    """The preset at its own geometry with the rehearsal's trunk, budget and data, then the variant."""
    base = get_preset(preset)
    total = base.train.epochs
    decay = tuple(max(1, round(e * EPOCHS / total)) for e in base.train.lr_decay_epochs if e < total)
    overrides: Dict[str, Any] = dict(
        dataset="synthetic", skeleton="ai_challenger", train_json="", train_images="", val_json="",
        val_images="", backbone=args.backbone, head_channels=args.head_channels, head_blocks=args.head_blocks,
        tiny_width=args.tiny_width, tiny_stem_channels=2 * args.tiny_width,
        batch_size=args.batch_size, epochs=EPOCHS, steps_per_epoch=args.steps // EPOCHS,
        lr_decay_epochs=decay, eval_every_epochs=EPOCHS // args.evals, max_val_images=args.val_images,
        deterministic=True, seed=args.seed, run_dir=run_dir, steps_per_call=10, log_every_steps=10 ** 9)
    if args.input:
        overrides.update(input_height=args.input, input_width=args.input)
    if args.lr:
        overrides["lr"] = args.lr
    if args.synthetic_dir:
        overrides["synthetic_dir"] = args.synthetic_dir
    if args.real_photos:
        # The COCO photographs of tests/data/real_photos, trained and scored on the same pictures
        # (memorising them at the preset's geometry; COCO AP through pycocotools).
        photos = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "tests", "data", "real_photos")
        annotations = os.path.join(photos, "coco_person_keypoints.json")
        overrides.update(dataset="coco", skeleton="coco", train_json=annotations, train_images=photos,
                         val_json=annotations, val_images=photos, max_val_images=0)
    if args.synthetic_images:
        try:
            train, val = (int(v) for v in args.synthetic_images.split(","))
        except ValueError:
            raise SystemExit(f"--synthetic-images: expected TRAIN,VAL image counts, got {args.synthetic_images!r}") from None
        overrides.update(synthetic_train_images=train, synthetic_val_images=val)
    cfg = base.replace(**overrides)
    try:
        cfg = cfg.replace(**fields)
        if cfg.train.lr_schedule == "cosine" and "warmup_steps" not in fields:
            cfg = cfg.replace(warmup_steps=max(1, args.steps // 20))
    except (KeyError, ValueError) as e:
        raise SystemExit(f"--variants: {e}") from None
    return cfg


def run_variant(name: str, cfg) -> Dict[str, Any]:
    import keras  # noqa: E402  (TensorFlow loads only when a variant runs, not for --help)

    from utils.training import Trainer  # noqa: E402  (likewise)

    keras.utils.set_random_seed(cfg.data.seed)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    result = trainer.fit()
    seconds = time.perf_counter() - start
    with open(os.path.join(cfg.train.run_dir, "history.json")) as f:
        history = json.load(f)
    # AI Challenger's scorer names them ap50 / ap75, COCOeval AP50 / AP75.
    curve = [{"step": h["step"], "score": round(h["score"], 4), "ap50": round(h.get("ap50", h.get("AP50", 0.0)), 3),
              "ap75": round(h.get("ap75", h.get("AP75", 0.0)), 3)} for h in history if "score" in h]
    last = curve[-1]
    return {"variant": name, "run_dir": cfg.train.run_dir, "steps": result["steps"], "seconds": round(seconds, 1),
            "score": last["score"], "ap50": last["ap50"], "ap75": last["ap75"], "curve": curve,
            "loss_root": round(history[-1]["loss_root"], 4), "loss_disp": round(history[-1]["loss_disp"], 4)}


def run_benchmark(name: str, argv: List[str]) -> Dict:
    parser = argparse.ArgumentParser(prog=f"benchmark.py {name}", description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ai_challenger_w32_512")
    parser.add_argument("--steps", type=int, default=400, help="training steps per variant (a multiple of 10)")
    parser.add_argument("--evals", type=int, default=5, choices=(1, 2, 5, 10), help="points on the score curve")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--val-images", type=int, default=100, help="images scored at the intermediate points")
    parser.add_argument("--backbone", default="hrnet_tiny")
    parser.add_argument("--head-channels", type=int, default=32)
    parser.add_argument("--head-blocks", type=int, default=1)
    parser.add_argument("--tiny-width", type=int, default=16, help="hrnet_tiny branch width (narrower: faster)")
    parser.add_argument("--lr", type=float, default=0.0,
                        help="learning rate (default: the preset's; the rehearsal's trunk and batch are not the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input", type=int, default=0, help="square input size (default: the preset's)")
    parser.add_argument("--synthetic-dir", default="", help="synthetic set cache (default: the config's)")
    parser.add_argument("--real-photos", action="store_true",
                        help="train and score on the real COCO photographs of tests/data/real_photos instead of "
                             "the synthetic set (COCO AP on the same pictures)")
    parser.add_argument("--synthetic-images", default="", metavar="TRAIN,VAL",
                        help="synthetic set size (default: the config's 2000,200)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="NAME:FIELD=VALUE,...")
    parser.add_argument("--only", default="", help="comma-separated names of the variants to run")
    parser.add_argument("--out", default="", help="also write the result here (json)")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.steps % EPOCHS:
        raise SystemExit(f"--steps must be a positive multiple of {EPOCHS}, got {args.steps}")
    variants = [parse_variant(v) for v in args.variants]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {n for n, _ in variants}
        if unknown:
            raise SystemExit(f"--only: no variant named {', '.join(sorted(unknown))}")
        variants = [(n, f) for n, f in variants if n in wanted]
    scratch = tempfile.mkdtemp(prefix="spm_recipe_")
    configs = [(n, variant_config(args.preset, f, args, os.path.join(scratch, n))) for n, f in variants]
    rows = []
    for n, cfg in configs:
        print(f"--- {n}: {cfg.data.input_width}x{cfg.data.input_height} {cfg.model.backbone}, "
              f"disp weight {cfg.loss.disp_loss_weight}, root {cfg.loss.root_loss}, "
              f"{cfg.train.lr_schedule} schedule, heatmaps {cfg.model.joint_heatmaps}", flush=True)
        rows.append(run_variant(n, cfg))
        print(json.dumps(rows[-1]), flush=True)
    cfg0 = configs[0][1]
    print("\n| variant | steps | wall s | score | AP@0.5 | AP@0.75 | score curve |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        curve = " ".join(f"{c['score']:.3f}" for c in r["curve"])
        print(f"| {r['variant']} | {r['steps']} | {r['seconds']:.0f} | {r['score']:.4f} | {r['ap50']:.3f} | "
              f"{r['ap75']:.3f} | {curve} |")
    result = {"benchmark": "recipe", "preset": args.preset, "data": "real_photos" if args.real_photos else "synthetic", "input": f"{cfg0.data.input_width}x{cfg0.data.input_height}",
              "backbone": args.backbone, "batch_size": args.batch_size, "steps": args.steps,
              "cores": os.cpu_count(), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result
