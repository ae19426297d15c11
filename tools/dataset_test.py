"""Look at what the network is trained on: images, SPR targets and their decoding, as PNGs.

    python3 tools/dataset_test.py --json val.json --images val/ --out /tmp/spr_look [--num 8]
        [--preset ai_challenger_w32_512] [--augmented --seed 3] [any config flag, e.g. --tau 5]

Each image goes through the input pipeline (``dataset.pipeline.InputPipeline.sample``: letterbox,
augmentation with ``--augmented``, SPR encoding), then the targets are decoded by the in-graph
decoder. One PNG per image, three panels at network-input size (enlarged to at least 512 pixels):

1. the root map as a heat overlay, and the displacement chains as arrows from each decoded root
   to its level-1 joints and on down the hierarchy (``--anchor root``: every arrow from the root);
2. the displacement discs (cells where some joint's displacement is trained, ``disp_weight``);
3. the decoded skeletons with root markers and scores, over the labelled ground-truth joints
   (white dots).

The annotation file is read with the preset's reader: AI Challenger format for the
``ai_challenger`` and ``tiny_synthetic`` presets (the synthetic set is written in that format),
COCO for ``coco_w32_512``.
"""

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from config.config import add_config_args, config_from_args  # noqa: E402
from dataset.augment import apply_colour  # noqa: E402
from dataset.pipeline import ImageError, InputPipeline, load_records  # noqa: E402
from nets import spr  # noqa: E402
from utils import drawing  # noqa: E402

GT_COLOR = (255, 255, 255)


def render_sample(sample, cfg, decoder, scale: int = 1) -> np.ndarray:
    """The three panels of one prepared sample, side by side: uint8 RGB [sH, 3sW, 3]."""

    sk, t = cfg.skeleton, sample.targets
    root_t, disp_t = tf.constant(t["root"][None]), tf.constant(t["disp"][None])
    poses, scores, num, _ = (x.numpy()[0] for x in decoder(root_t, disp_t))
    cells, _, _ = spr.find_root_peaks(root_t, cfg.spr)
    n = int(num)
    poses, scores = poses[:n], scores[:n]
    roots = spr.cell_centres(cells.numpy()[0, :n], cfg.spr.output_stride) * scale
    poses = poses * scale
    parents = spr.anchor_parents(sk, cfg.spr.anchor)
    h, w = sample.image.shape[:2]
    # the picture as the network sees it: with the colour augmentation the training step applies
    coloured = apply_colour(sample.image[None], sample.colour[None])[0].numpy()
    image = cv2.resize(np.rint(coloured).astype(np.uint8), (w * scale, h * scale), interpolation=cv2.INTER_LINEAR)

    chains = drawing.heat_overlay(image, t["root"][..., 0], alpha=0.8)
    for root, pose in zip(roots, poses):
        drawing.draw_displacement_chains(chains, root, pose, parents)
        drawing.draw_root(chains, root)

    # cells where displacements are trained, hotter where more joints' discs overlap
    count = t["disp_weight"][..., 0::2].sum(axis=-1)
    heat = np.where(count > 0, 0.35 + 0.65 * count / max(count.max(), 1.0), 0.0)
    discs = drawing.heat_overlay(image, heat, alpha=0.6)

    decoded = image.copy()
    labelled = sample.keypoints[..., 2] > 0
    for kp, lab in zip(sample.keypoints, labelled):
        for x, y in kp[lab, :2] * scale:
            drawing.draw_root(decoded, (x, y), radius=1, color=GT_COLOR)
    drawing.draw_poses(decoded, poses, sk, scores=scores, roots=roots)
    return np.concatenate([chains, discs, decoded], axis=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--json", required=True, help="annotation file (format of the preset's dataset)")
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--out", required=True, help="output folder for the PNGs (created)")
    parser.add_argument("--num", type=int, default=8, help="number of images (default 8)")
    parser.add_argument("--start", type=int, default=0, help="first image index (default 0)")
    parser.add_argument("--augmented", action="store_true",
                        help="apply training augmentation (seeded by the config's --seed)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        written = run(args)
    except (ValueError, OSError) as e:      # bad config, malformed annotations, unusable image
        print(f"dataset_test: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out": os.path.abspath(args.out), "images": len(written)}))
    return 0


def run(args) -> list:

    cfg = config_from_args(args)
    dataset = "coco" if cfg.data.dataset == "coco" else "ai_challenger"
    cfg = cfg.replace(dataset=dataset, val_json=args.json, val_images=args.images, max_val_images=0)
    if not os.path.isdir(args.images):
        raise FileNotFoundError(f"{args.images}: no such image folder")
    records, stats = load_records(cfg, "val")
    print(stats.summary())
    chosen = records[args.start:args.start + max(args.num, 0)]
    if not chosen:
        raise ValueError(f"{args.json}: no image at index {args.start} (the file has {len(records)})")
    pipeline = InputPipeline(cfg, "train" if args.augmented else "val", chosen)
    decoder = spr.make_decoder(cfg.skeleton, cfg.spr, cfg.output_shape)
    os.makedirs(args.out, exist_ok=True)
    written = []
    for i, record in enumerate(chosen):
        try:
            sample = pipeline.sample(i, cfg.data.seed + i)
        except ImageError as e:
            raise OSError(str(e)) from None
        path = os.path.join(args.out, f"{args.start + i:04d}_{record.image_id}.png")
        scale = max(1, -(-512 // max(cfg.data.input_height, cfg.data.input_width)))
        written.append(drawing.save_rgb(path, render_sample(sample, cfg, decoder, scale)))
        print(f"{path}: {record.num_people} people annotated, "
              f"{int((sample.targets['root'] == 1.0).sum())} root peaks")
    return written


if __name__ == "__main__":
    sys.exit(main())
