"""Photo-sized test pictures for the pipeline benchmark (no data set can be downloaded here).

``ensure_photos(n, side)`` renders ``n`` synthetic multi-person scenes at ``side x side`` pixels
(``dataset/synthetic.py``, exact annotations) and adds photographic detail before the JPEG is
written: a 1/f-like texture (noise at seven octaves, amplitude growing with the scale, as in
natural images) and sensor grain. The synthetic scenes alone are flat shapes that compress to
about 0.25 bytes per pixel at quality 90 and decode faster than photographs; with the texture
they reach about 0.5 bytes per pixel, the density of COCO's JPEGs (about 160 KB for 640x480).
The benchmark prints the files' bytes per pixel so the reader can check that claim.

Written once into ``~/.cache/spm_tf2/photos/<n>_<side>`` with an AI Challenger annotation file
``annotations.json``; a ``COMPLETE`` marker is written last.
"""

from __future__ import annotations

import json
import os
from typing import Tuple

import cv2
import numpy as np

from dataset.ai_challenger import to_ai_challenger_json
from dataset.synthetic import GeneratorOptions, render_record

TEXTURE_AMPLITUDE = 4.0     # grey levels per octave unit
GRAIN = 12.0                # grey levels of per-pixel grain (std)
JPEG_QUALITY = 90


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    out = np.zeros((height, width, 3), np.float32)
    for octave in range(1, 8):
        s = 2 ** octave
        small = rng.standard_normal((max(1, height // s), max(1, width // s), 3)).astype(np.float32)
        out += cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC) * (s ** 0.5) * TEXTURE_AMPLITUDE
    out += rng.standard_normal((height, width, 1)).astype(np.float32) * GRAIN
    return out


def ensure_photos(count: int, side: int = 640, root: str = "") -> Tuple[str, str]:
    """(annotation file, image folder) of ``count`` photo-like JPEGs of ``side x side`` pixels."""
    root = root or os.path.join(os.path.expanduser("~"), ".cache", "spm_tf2", "photos", f"{count}_{side}")
    images, annotations = os.path.join(root, "images"), os.path.join(root, "annotations.json")
    if os.path.exists(os.path.join(root, "COMPLETE")):
        return annotations, images
    os.makedirs(images, exist_ok=True)
    options = GeneratorOptions(min_side=side, max_side=side)
    records = []
    for index in range(count):
        record, rgb = render_record(0, "train", index, images, options)
        rng = np.random.default_rng(index)
        photo = np.clip(rgb.astype(np.float32) + _texture(rng, *rgb.shape[:2]), 0, 255).astype(np.uint8)
        ok, data = cv2.imencode(".jpg", photo[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode {record.image_path}")
        with open(record.image_path, "wb") as f:
            f.write(data.tobytes())
        records.append(record)
    with open(annotations, "w") as f:
        json.dump(to_ai_challenger_json(records), f)
    with open(os.path.join(root, "COMPLETE"), "w") as f:
        f.write(f"{count} images of {side}x{side}\n")
    return annotations, images
