"""Run a trained SPM model on your own pictures or a video and draw the skeletons.

    python3 tools/spm_model_test.py --ckpt runs/tiny_synthetic --imgs photo.jpg --output out/
    python3 tools/spm_model_test.py --ckpt RUN --imgs folder/ --output out/ --score 0.3
    python3 tools/spm_model_test.py --ckpt RUN --video clip.mp4 --output out/     # writes out/clip.mp4
    python3 tools/spm_model_test.py --ckpt RUN --imgs photos/ --output out/ --long-side 1024 \
        --flip --scales 0.5,1,2 --json out/poses.json

Each person is drawn in the skeleton's colours with a marker at its root and the root score.
Headless by default; ``--show`` also opens a window where a display exists. Flags of the earlier
implementation: ``--score`` (root threshold), ``--dist`` (root NMS radius in output-map cells:
window 2 * dist + 1), ``--netH``/``--netW`` (network input size; the weights are resolution-free).
``--long-side N`` runs each picture at its own input size (aspect ratio kept, long side N, padded to
a multiple of 32); ``--flip`` and ``--scales`` average the maps of mirrored and rescaled inputs;
``--json FILE`` writes the poses of every picture in the AI Challenger submission format (image id
= file stem) in the picture's pixels: a photo as a viewer shows it (EXIF orientation applied, as the
SavedModel does). ``--batch-size N`` runs N pictures of a folder at a time (memory stays flat in
the number of pictures). Prints the latency per frame, and frames/s for a video.
"""

import argparse
import json
import logging
import os
import sys
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from utils import predict  # noqa: E402
from utils.drawing import draw_prediction  # noqa: E402
from utils.evaluation import aic_prediction  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(path: str):
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such image file or folder")
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"{path}: the folder holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--imgs", help="an image file or a folder of images")
    src.add_argument("--video", help="a video file")
    parser.add_argument("--ckpt", required=True, help="run directory or .weights.h5 (config.json beside it)")
    parser.add_argument("--output", required=True, help="folder for the drawn images or the .mp4")
    parser.add_argument("--score", type=float, default=None, help="root score threshold (default: config)")
    parser.add_argument("--dist", type=int, default=None, help="root NMS radius in output-map cells")
    parser.add_argument("--netH", type=int, default=None, help="network input height (multiple of 32)")
    parser.add_argument("--netW", type=int, default=None, help="network input width (multiple of 32)")
    parser.add_argument("--flip", action="store_true", help="flip testing")
    parser.add_argument("--scales", default="1", help="multi-scale testing, e.g. 0.5,1,2 (default 1)")
    parser.add_argument("--long-side", type=int, default=0,
                        help="each picture at its own input size with this long side (multiple of 32)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="pictures of a folder run together (memory grows with it; --long-side runs one at a time)")
    parser.add_argument("--json", default=None, help="also write the poses as AI Challenger submission json")
    parser.add_argument("--show", action="store_true", help="also show a window (needs a display)")
    parser.add_argument("--config", default=None, help="config.json to build the model from")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        files = list_images(args.imgs) if args.imgs else None
        if args.video and not os.path.isfile(args.video):
            raise FileNotFoundError(f"{args.video}: no such video file")

        overrides = {}
        if args.score is not None:
            overrides["score_threshold"] = args.score
        if args.dist is not None:
            overrides["nms_window"] = 2 * args.dist + 1
        if args.netH:
            overrides["input_height"] = args.netH
        if args.netW:
            overrides["input_width"] = args.netW
        if args.long_side:
            predict.input_size(1, 1, args.long_side)             # validates the value
        model, cfg = predict.load_trained_model(args.ckpt, args.config, overrides=overrides)
        predictor = predict.Predictor(model, cfg, flip=args.flip, scales=predict.parse_scales(args.scales))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    show = args.show and bool(os.environ.get("DISPLAY"))
    if args.show and not show:
        print("warning: --show needs a display (DISPLAY is not set); writing files only", file=sys.stderr)

    submission = []

    def process(rgb):
        start = time.perf_counter()
        prediction, = predict.predict_images(predictor, [rgb], long_side=args.long_side)
        ms = (time.perf_counter() - start) * 1000
        drawn = draw_prediction(rgb, prediction, cfg.skeleton)
        return drawn, prediction, ms

    latencies = []
    if files is not None:
        written = 0
        stop = False
        for first in range(0, len(files), args.batch_size):
            paths, pictures = [], []
            for path in files[first:first + args.batch_size]:
                try:
                    pictures.append(predict.read_rgb(path))      # as a viewer shows it (EXIF applied)
                    paths.append(path)
                except predict.ImageError as e:
                    print(f"warning: {e}, skipped", file=sys.stderr)
            if not pictures:
                continue
            start = time.perf_counter()
            predictions = predict.predict_images(predictor, pictures, long_side=args.long_side,
                                                 batch_size=args.batch_size)
            ms = (time.perf_counter() - start) * 1000 / len(pictures)
            for path, rgb, prediction in zip(paths, pictures, predictions):
                drawn = draw_prediction(rgb, prediction, cfg.skeleton)
                n = len(prediction.poses)
                latencies.append(ms)
                stem = os.path.splitext(os.path.basename(path))[0]
                submission.append(aic_prediction(stem, prediction.poses))
                out = os.path.join(args.output, stem + "_spm.png")
                cv2.imwrite(out, cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
                written += 1
                print(f"{path}: {n} people, {ms:.1f} ms -> {out}")
                if show:
                    cv2.imshow("spm", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
                    if cv2.waitKey(0) & 0xFF == ord("q"):
                        stop = True
                        break
            if stop:
                break
        if not written:
            print(f"error: no readable image in {args.imgs}", file=sys.stderr)
            return 2
        if args.json:
            with open(args.json, "w") as f:
                json.dump(submission, f)
            print(f"poses of {len(submission)} pictures written to {args.json}")
    else:
        cap = cv2.VideoCapture(args.video)
        if not cap.isOpened():
            print(f"error: {args.video}: cannot open the video", file=sys.stderr)
            return 2
        fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        out = os.path.join(args.output, os.path.splitext(os.path.basename(args.video))[0] + ".mp4")
        writer = None
        video_start = time.perf_counter()
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            drawn, prediction, ms = process(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            n = len(prediction.poses)
            latencies.append(ms)
            # MPEG-4 frames have even sides (mp4v would drop an odd last row or column): the
            # frame grows by a copy of its last row / column, the picture keeps every pixel
            pad = (drawn.shape[0] % 2, drawn.shape[1] % 2)
            if any(pad):
                drawn = cv2.copyMakeBorder(drawn, 0, pad[0], 0, pad[1], cv2.BORDER_REPLICATE)
            if writer is None:
                if any(pad):
                    print(f"{args.video}: {bgr.shape[1]}x{bgr.shape[0]} frames written as "
                          f"{drawn.shape[1]}x{drawn.shape[0]} (MPEG-4 needs even sides; the last "
                          f"{'row' if pad[0] else 'column'}{' and column' if all(pad) else ''} repeated)")
                writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                         (drawn.shape[1], drawn.shape[0]))
            writer.write(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
            print(f"frame {len(latencies)}: {n} people, {ms:.1f} ms")
            if show:
                cv2.imshow("spm", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
                if cv2.waitKey(1) & 0xFF == ord("q"):
                    break
        cap.release()
        if writer is None:
            print(f"error: {args.video}: no frame could be read", file=sys.stderr)
            return 2
        writer.release()
        seconds = time.perf_counter() - video_start
        print(f"video written to {out}: {len(latencies)} frames in {seconds:.1f} s, "
              f"{len(latencies) / seconds:.1f} frames/s (read, predict, draw, write)")
    steady = latencies[1:] or latencies
    print(f"latency per frame: first {latencies[0]:.1f} ms (tracing), then median "
          f"{float(np.median(steady)):.1f} ms over {len(steady)} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
