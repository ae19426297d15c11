"""A deterministic synthetic multi-person dataset: the built-in default data of ``main.py``.

Each image shows 1 to 6 articulated human-like figures on a cluttered background. A figure is
posed by a small kinematic model of the AI Challenger skeleton (torso lean, head tilt, shoulder
and hip angles, elbow and knee bends, foreshortening) and drawn with thickness: legs, torso,
arms, then the head, with clothing colours and textures. What makes the data learnable is
what makes real people learnable:

* **left and right are readable**: figures face the camera (a face is drawn on the head), so the
  person's right side is on the image's left as for a real person seen from the front, and the
  right limbs are drawn a darker shade than the left ones (a cue a horizontal flip cannot keep:
  with flip augmentation only the facing direction tells the sides apart, as in real data);
* **the head is distinct** (skin colour, hair, eyes and mouth), hands and feet are marked.

Ground truth is exact, not guessed:

* joints are the kinematic model's points in continuous pixel coordinates (pixel ``i`` covers
  ``[i, i + 1)``, dataset/records.py); drawing uses OpenCV's pixel-centre coordinates
  (continuous ``x`` is OpenCV ``x - 0.5``) with sub-pixel precision;
* figures are drawn far to near (small to large); a joint whose pixel a *later* figure drew over
  is **occluded**; a joint outside the image is **unlabelled** (AI Challenger ``v = 3``,
  ``x = y = 0``); otherwise it is **visible**;
* a box is the tight box of the figure's drawn pixels, clipped to the image (occluded pixels
  included, as an annotator would draw it).

Everything is a function of ``(seed, split, image index)`` through NumPy ``SeedSequence``s, so a
dataset is byte-identical however many threads generate it. :func:`ensure_synthetic_dataset`
writes JPEGs plus AI Challenger json (and COCO json through ``dataset/convert.py``) into a cache
folder keyed by generator version, seed and counts, and reuses it once its completion marker
exists.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from config.skeletons import Skeleton, get_skeleton
from dataset.ai_challenger import to_ai_challenger_json
from dataset.convert import aic_to_coco
from dataset.errors import save_json
from config.skeletons import VIS_OCCLUDED, VIS_UNLABELLED, VIS_VISIBLE
from dataset.records import ImageRecord

log = logging.getLogger(__name__)

# Bump whenever the rendered images or annotations change: it is part of the cache key.
GENERATOR_VERSION = 2
COMPLETE_MARKER = "COMPLETE.json"
SPLITS = ("train", "val")
_SPLIT_IDS = {"train": 0, "val": 1}

_SHIFT = 4                      # OpenCV sub-pixel bits for drawing
_ONE = 1 << _SHIFT


# ----------------------------------------------------------------------------- kinematic model

@dataclasses.dataclass(frozen=True)
class GeneratorOptions:
    """Ranges of the rendered scenes (the defaults are what ``main.py`` trains on)."""
    min_side: int = 320
    max_side: int = 640
    max_people: int = 6
    people_weights: Tuple[float, ...] = (0.3, 0.3, 0.18, 0.1, 0.07, 0.05)  # P(1..6 people)
    min_height_frac: float = 0.3        # person height / image height, log-uniform
    max_height_frac: float = 0.9
    min_labelled_joints: int = 6        # a figure with fewer joints in frame is placed again
    max_box_iou: float = 0.25           # overlap allowed between two figures' joint boxes
    back_facing_prob: float = 0.0       # figures seen from behind (no face, sides mirrored)
    jpeg_quality: int = 90


# Body proportions in units of the person's standing height (head top to ankles ~ 1).
_TORSO = 0.32           # pelvis centre -> neck
_SHOULDER_DROP = 0.02   # shoulders sit a little below the neck
_NECK_HEAD = 0.17       # neck -> head top
_SHOULDER_HALF = 0.11
_HIP_HALF = 0.075
_UPPER_ARM, _FOREARM = 0.17, 0.16
_THIGH, _SHIN = 0.25, 0.23
# Limb thicknesses (same units).
_T_UPPER_ARM, _T_FOREARM, _T_THIGH, _T_SHIN, _T_NECK = 0.055, 0.045, 0.075, 0.062, 0.05


def _unit(angle: np.ndarray, side: float) -> np.ndarray:
    """Direction at ``angle`` (radians) from straight down, turned outward to ``side`` (-1/+1)."""
    return np.array([side * np.sin(angle), np.cos(angle)])


def sample_pose(rng: np.random.Generator, skeleton: Skeleton,
                back_facing: bool = False) -> Tuple[np.ndarray, float]:
    """A random pose in the body frame: (joints [J, 2], body-width factor).

    Body frame: origin at the pelvis centre, x to the image's right, y down, unit = standing
    height. Seen from the front, the person's right side is at negative x. Angles are measured
    from straight down, positive outward from the body.
    """
    deg = np.deg2rad
    width = rng.uniform(0.6, 1.0)            # < 1: torso turned away from the camera a little
    torso = _TORSO * rng.uniform(0.85, 1.05)
    pts: Dict[str, np.ndarray] = {}
    neck = np.array([0.0, -torso])
    pts["neck"] = neck
    tilt = deg(rng.uniform(-20, 20))
    pts["head_top"] = neck + _NECK_HEAD * rng.uniform(0.9, 1.1) * np.array([np.sin(tilt), -np.cos(tilt)])
    # Person's right = side -1 when facing the camera.
    for name, side in (("right", -1.0), ("left", 1.0)):
        s = side if not back_facing else -side
        shoulder = np.array([s * _SHOULDER_HALF * width, -torso + _SHOULDER_DROP])
        a_upper = deg(rng.uniform(-30, 150))
        a_fore = a_upper + deg(rng.uniform(-60, 120))
        elbow = shoulder + _UPPER_ARM * rng.uniform(0.65, 1.0) * _unit(a_upper, s)
        wrist = elbow + _FOREARM * rng.uniform(0.65, 1.0) * _unit(a_fore, s)
        hip = np.array([s * _HIP_HALF * width, 0.0])
        a_thigh = deg(rng.uniform(-15, 45))
        a_shin = a_thigh + deg(rng.uniform(-35, 25))
        knee = hip + _THIGH * rng.uniform(0.7, 1.0) * _unit(a_thigh, s)
        ankle = knee + _SHIN * rng.uniform(0.7, 1.0) * _unit(a_shin, s)
        for joint, p in (("shoulder", shoulder), ("elbow", elbow), ("wrist", wrist),
                         ("hip", hip), ("knee", knee), ("ankle", ankle)):
            pts[f"{name}_{joint}"] = p
    return np.stack([pts[n] for n in skeleton.joint_names]), width


@dataclasses.dataclass
class Figure:
    """One posed figure: its body-frame pose and how it sits in the image."""
    body: np.ndarray            # float64 [J, 2] joints in the body frame (see sample_pose)
    width: float                # body-width factor of the pose
    height: float               # standing height in pixels
    angle: float                # torso lean, radians (positive turns the head to the image's right)
    center: np.ndarray          # pelvis centre, continuous image coordinates [2]
    back_facing: bool
    colors: Dict[str, np.ndarray]
    pattern: int                # clothing texture: 0 solid, 1 stripes, 2 checks, 3 blotches
    pattern_params: np.ndarray  # float [4] in [0, 1): direction, period, and two shape numbers
    joints: np.ndarray = dataclasses.field(init=False)  # float64 [J, 2] image coordinates

    def __post_init__(self):
        self.joints = self.to_image(self.body)

    def to_image(self, body: np.ndarray) -> np.ndarray:
        """Body-frame points [..., 2] -> continuous image coordinates."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        rot = np.array([[c, -s], [s, c]])
        return np.asarray(body) @ rot.T * self.height + self.center


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    px = np.uint8([[[h % 180, np.clip(s, 0, 255), np.clip(v, 0, 255)]]])
    return cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _random_colors(rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """Clothing, skin, hair and shoe colours (RGB float32)."""
    return {
        "shirt": _hsv(rng.uniform(0, 180), rng.uniform(40, 255), rng.uniform(70, 255)),
        "trousers": _hsv(rng.uniform(0, 180), rng.uniform(30, 230), rng.uniform(40, 220)),
        "skin": _hsv(rng.uniform(5, 20), rng.uniform(60, 160), rng.uniform(100, 240)),
        "hair": _hsv(rng.uniform(0, 30), rng.uniform(50, 200), rng.uniform(10, 80)),
        "shoes": _hsv(rng.uniform(0, 180), rng.uniform(0, 120), rng.uniform(10, 70)),
        "sleeves": np.float32(rng.random() < 0.4),   # 1: long sleeves (forearms in shirt colour)
    }


def make_figure(rng: np.random.Generator, skeleton: Skeleton, height: float,
                center: Sequence[float], back_facing: bool = False) -> Figure:
    """A randomly posed and dressed figure of standing ``height`` pixels, pelvis at ``center``."""
    body, width = sample_pose(rng, skeleton, back_facing)
    return Figure(body=body, width=width, height=float(height),
                  angle=float(np.deg2rad(rng.normal(0.0, 8.0))),
                  center=np.asarray(center, np.float64), back_facing=back_facing,
                  colors=_random_colors(rng), pattern=int(rng.integers(0, 4)),
                  pattern_params=rng.uniform(0.0, 1.0, size=4))


# ----------------------------------------------------------------------------- drawing

# Part labels drawn into a figure's label crop; each part's colour is looked up afterwards.
_PARTS = ("torso", "neck", "head", "hair", "face",
          "right_upper_arm", "right_forearm", "left_upper_arm", "left_forearm",
          "right_thigh", "right_shin", "left_thigh", "left_shin",
          "right_hand", "left_hand", "right_foot", "left_foot")
_PART_ID = {p: i + 1 for i, p in enumerate(_PARTS)}
_CLOTHING = np.array([p == "torso" or p.endswith(("upper_arm", "thigh", "shin")) for p in ("",) + _PARTS])
_RIGHT_SHADE = 0.7      # right limbs are drawn darker than left limbs
_FIGURE_MARGIN = 0.15   # crop margin around the joints, in heights (covers thickness, hair, feet)


def _part_colors(fig: Figure) -> np.ndarray:
    """float32 [num_parts + 1, 3]: the colour of each part label (row 0 unused)."""
    c = fig.colors
    forearm = c["shirt"] if c["sleeves"] else c["skin"]
    base = {"torso": c["shirt"], "neck": c["skin"], "head": c["skin"], "hair": c["hair"],
            "face": c["hair"] * 0.4, "upper_arm": c["shirt"], "forearm": forearm,
            "thigh": c["trousers"], "shin": c["trousers"], "hand": c["skin"], "foot": c["shoes"]}
    lut = np.zeros((len(_PARTS) + 1, 3), np.float32)
    for part, pid in _PART_ID.items():
        side, _, kind = part.partition("_")
        if side in ("right", "left"):
            lut[pid] = base[kind] * (_RIGHT_SHADE if side == "right" else 1.0)
        else:
            lut[pid] = base[part]
    return lut


def _texture(fig: Figure, shape: Tuple[int, int], origin: np.ndarray) -> np.ndarray:
    """float32 [h, w]: multiplicative clothing texture of a figure over its crop."""
    if fig.pattern == 0:
        return np.ones(shape, np.float32)
    a, b, c, d = fig.pattern_params
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    xx += origin[0]
    yy += origin[1]
    period = max(3.0, fig.height * (0.02 + 0.05 * b))
    theta = np.pi * a
    u = (np.cos(theta) * xx + np.sin(theta) * yy) / period
    if fig.pattern == 1:                                        # stripes
        dark = np.sin(2 * np.pi * u) > 0
    elif fig.pattern == 2:                                      # checks
        v = (np.cos(theta) * yy - np.sin(theta) * xx) / period
        dark = (np.floor(u) + np.floor(v)) % 2 == 0
    else:                                                       # blotches
        dark = np.sin(2 * np.pi * u) * np.sin(2 * np.pi * (c * xx - d * yy) / period) > 0.2
    return np.where(dark, 0.55 + 0.3 * c, 1.0).astype(np.float32)


def _torso_polygon(fig: Figure, skeleton: Skeleton) -> np.ndarray:
    """Image-space torso outline: shoulders and hips pushed outward, top just above the neck."""
    b = {n: fig.body[skeleton.index(n)] for n in ("right_shoulder", "left_shoulder",
                                                  "right_hip", "left_hip", "neck")}
    out = lambda p, dx: p[0] + np.sign(p[0]) * dx  # noqa: E731  (outward along body x)
    top = b["neck"][1] - 0.025
    rs, ls, rh, lh = b["right_shoulder"], b["left_shoulder"], b["right_hip"], b["left_hip"]
    body = np.array([[out(rs, 0.025), top], [out(ls, 0.025), top],
                     [out(ls, 0.03), ls[1] + 0.05], [out(lh, 0.035), lh[1] + 0.03],
                     [out(rh, 0.035), rh[1] + 0.03], [out(rs, 0.03), rs[1] + 0.05]])
    return fig.to_image(body)


def _draw_parts(fig: Figure, labels: np.ndarray, origin: np.ndarray, skeleton: Skeleton) -> None:
    """Draw the part labels of ``fig`` into ``labels`` (a crop whose top-left pixel is ``origin``).

    Back to front: legs, torso, arms, head. OpenCV draws in pixel-centre coordinates, so a
    continuous point ``p`` is drawn at ``p - 0.5`` (fixed point, ``_SHIFT`` fractional bits).
    """
    j = {n: fig.joints[skeleton.index(n)] for n in skeleton.joint_names}
    h = fig.height

    def pt(p):
        q = np.round((np.asarray(p) - origin - 0.5) * _ONE).astype(np.int64)
        return int(q[0]), int(q[1])

    def length(x):
        return max(1, int(round(x * _ONE)))

    def limb(a, b, part, thickness):
        cv2.line(labels, pt(a), pt(b), _PART_ID[part], max(2, int(round(h * thickness))),
                 cv2.LINE_8, _SHIFT)

    def disc(p, part, radius):
        cv2.circle(labels, pt(p), length(h * radius), _PART_ID[part], -1, cv2.LINE_8, _SHIFT)

    for side in ("right", "left"):
        limb(j[f"{side}_hip"], j[f"{side}_knee"], f"{side}_thigh", _T_THIGH)
        limb(j[f"{side}_knee"], j[f"{side}_ankle"], f"{side}_shin", _T_SHIN)
        disc(j[f"{side}_ankle"], f"{side}_foot", 0.035)
    poly = np.array([pt(p) for p in _torso_polygon(fig, skeleton)], np.int32)
    cv2.fillPoly(labels, [poly], _PART_ID["torso"], cv2.LINE_8, _SHIFT)
    for side in ("right", "left"):
        limb(j[f"{side}_shoulder"], j[f"{side}_elbow"], f"{side}_upper_arm", _T_UPPER_ARM)
        limb(j[f"{side}_elbow"], j[f"{side}_wrist"], f"{side}_forearm", _T_FOREARM)
        disc(j[f"{side}_wrist"], f"{side}_hand", 0.03)
    # Head: an ellipse along neck -> head top that reaches just beyond the head-top joint.
    neck, head_top = j["neck"], j["head_top"]
    v = head_top - neck
    vlen = max(float(np.hypot(*v)), 1e-6)
    centre = neck + 0.58 * v
    angle = float(np.degrees(np.arctan2(v[1], v[0])))
    along, across = 0.47 * vlen, 0.075 * h
    limb(neck, centre, "neck", _T_NECK)
    cv2.ellipse(labels, pt(centre), (length(along), length(across)), angle, 0, 360,
                _PART_ID["head"], -1, cv2.LINE_8, _SHIFT)
    if fig.back_facing:      # seen from behind: hair all over
        cv2.ellipse(labels, pt(centre), (length(along * 1.02), length(across * 1.02)), angle, 0, 360,
                    _PART_ID["hair"], -1, cv2.LINE_8, _SHIFT)
        return
    # Hair over the half towards the head top, then the face: two eyes and a mouth.
    cv2.ellipse(labels, pt(centre + 0.12 * v), (length(along * 0.95), length(across * 1.04)), angle,
                -90, 90, _PART_ID["hair"], -1, cv2.LINE_8, _SHIFT)
    side = np.array([-v[1], v[0]]) / vlen
    for s in (-1.0, 1.0):
        disc(centre - 0.06 * v + s * 0.4 * across * side, "face", 0.011)
    mouth = centre - 0.33 * v
    cv2.line(labels, pt(mouth - 0.3 * across * side), pt(mouth + 0.3 * across * side),
             _PART_ID["face"], max(1, int(round(0.008 * h))), cv2.LINE_8, _SHIFT)


def _paint_figure(fig: Figure, image: np.ndarray, owner: np.ndarray, label: int,
                  skeleton: Skeleton) -> Optional[np.ndarray]:
    """Draw ``fig`` over ``image``, mark its pixels ``label`` in ``owner``; returns its tight box.

    The box is ``[x1, y1, x2, y2]`` in continuous coordinates (``x2`` is one past the last
    column), or None when no pixel of the figure falls inside the image.
    """
    H, W = owner.shape
    pad = _FIGURE_MARGIN * fig.height
    lo = np.floor(fig.joints.min(axis=0) - pad).astype(int)
    hi = np.ceil(fig.joints.max(axis=0) + pad).astype(int)
    x0, y0 = max(lo[0], 0), max(lo[1], 0)
    x1, y1 = min(hi[0], W), min(hi[1], H)
    if x1 <= x0 or y1 <= y0:
        return None
    origin = np.array([x0, y0], np.float64)
    labels = np.zeros((y1 - y0, x1 - x0), np.uint8)
    _draw_parts(fig, labels, origin, skeleton)
    mask = labels > 0
    if not mask.any():
        return None
    colors = _part_colors(fig)[labels]
    colors *= np.where(_CLOTHING[labels], _texture(fig, labels.shape, origin), 1.0)[..., None]
    image[y0:y1, x0:x1][mask] = np.clip(colors[mask], 0, 255).astype(np.uint8)
    owner[y0:y1, x0:x1][mask] = label
    ys, xs = np.nonzero(mask)
    return np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1], np.float32)


def _background(rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    """uint8 RGB clutter: a colour gradient and random filled shapes and lines."""
    c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    # A linear gradient: exact at the four corners, bilinear resizing fills in the rest.
    corners = np.array([[0.0, np.cos(theta)], [np.sin(theta), np.cos(theta) + np.sin(theta)]], np.float32)
    corners = (corners - corners.min()) / max(float(np.ptp(corners)), 1e-6)
    small = (c0 + (c1 - c0) * corners[..., None]).astype(np.uint8)
    image = cv2.resize(small, (W, H), interpolation=cv2.INTER_LINEAR)
    for _ in range(int(rng.integers(3, 16))):
        color = tuple(float(v) for v in rng.uniform(0, 255, size=3))
        kind = rng.integers(0, 5)
        x, y = rng.uniform(-0.1, 1.1) * W, rng.uniform(-0.1, 1.1) * H
        size = rng.uniform(0.03, 0.35) * min(H, W)
        p = (int(x), int(y))
        if kind == 0:
            q = (int(x + rng.uniform(-1, 1) * size), int(y + rng.uniform(-1, 1) * size))
            cv2.rectangle(image, p, q, color, -1)
        elif kind == 1:
            cv2.circle(image, p, int(size / 2), color, -1, cv2.LINE_AA)
        elif kind == 2:
            cv2.ellipse(image, p, (int(size / 2), int(size * rng.uniform(0.1, 0.5))),
                        float(rng.uniform(0, 180)), 0, 360, color, -1, cv2.LINE_AA)
        elif kind == 3:
            q = (int(x + rng.uniform(-1, 1) * size), int(y + rng.uniform(-1, 1) * size))
            cv2.line(image, p, q, color, max(1, int(rng.uniform(0.005, 0.04) * min(H, W))), cv2.LINE_AA)
        else:
            pts = (np.array([x, y]) + rng.uniform(-1, 1, size=(int(rng.integers(3, 7)), 2)) * size)
            cv2.fillPoly(image, [pts.astype(np.int32)], color, cv2.LINE_AA)
    return image


def _place_figures(rng: np.random.Generator, skeleton: Skeleton, H: int, W: int,
                   options: GeneratorOptions) -> List[Figure]:
    """Figures in drawing order (far to near, i.e. small to large).

    A figure needs ``min_labelled_joints`` joints inside the image (so partial figures at the
    borders occur, but not slivers) and may overlap an earlier figure's joint box by at most
    ``max_box_iou``; a figure that cannot be placed in 30 tries is left out.
    """
    weights = np.asarray(options.people_weights[:options.max_people], np.float64)
    n = int(rng.choice(np.arange(1, len(weights) + 1), p=weights / weights.sum()))
    top = options.max_height_frac - 0.05 * (n - 1)
    fracs = np.exp(rng.uniform(np.log(options.min_height_frac), np.log(max(top, options.min_height_frac)),
                               size=n))
    figures: List[Figure] = []
    boxes: List[np.ndarray] = []
    for height in np.sort(fracs) * H:
        for _ in range(30):
            center = (rng.uniform(-0.1, 1.1) * W, rng.uniform(-0.25 * height, H - 0.75 * height) + 0.5 * height)
            fig = make_figure(rng, skeleton, height, center, rng.random() < options.back_facing_prob)
            inside = _in_frame(fig.joints, H, W)
            if inside.sum() < options.min_labelled_joints:
                continue
            box = np.concatenate([fig.joints.min(0), fig.joints.max(0)])
            if boxes and max(_iou(box, b) for b in boxes) > options.max_box_iou:
                continue
            figures.append(fig)
            boxes.append(box)
            break
    return figures


def _in_frame(points: np.ndarray, H: int, W: int) -> np.ndarray:
    return (points[:, 0] >= 0) & (points[:, 0] < W) & (points[:, 1] >= 0) & (points[:, 1] < H)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ----------------------------------------------------------------------------- one image

@dataclasses.dataclass
class SyntheticImage:
    """A rendered image with its exact annotation.

    Attributes:
        image: uint8 RGB [H, W, 3].
        keypoints: float32 [N, J, 3]: x, y, internal visibility (dataset/records.py);
            unlabelled joints (outside the image) are (0, 0, 0).
        boxes: float32 [N, 4]: tight x1, y1, x2, y2 of each figure's drawn pixels.
        owner: uint8 [H, W]: 0 for background, ``n + 1`` where figure ``n`` is the one seen.
    """
    image: np.ndarray
    keypoints: np.ndarray
    boxes: np.ndarray
    owner: np.ndarray


def render_image(rng: np.random.Generator, skeleton: Optional[Skeleton] = None,
                 options: GeneratorOptions = GeneratorOptions()) -> SyntheticImage:
    """Render one random scene; everything drawn is a function of ``rng``'s state."""
    skeleton = skeleton or get_skeleton("ai_challenger")
    H, W = (int(v) for v in rng.integers(options.min_side, options.max_side + 1, size=2))
    background = _background(rng, H, W)
    sample = paint_scene(background, _place_figures(rng, skeleton, H, W, options), skeleton)
    # Sensor noise and blur over everything, so figures are not noise-free cut-outs.
    sigma = rng.uniform(0.0, 8.0)
    if sigma > 1.0:
        noise = rng.standard_normal((H, W, 1), dtype=np.float32) * sigma   # luminance noise
        sample.image = np.clip(sample.image + noise, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        sample.image = cv2.GaussianBlur(sample.image, (3, 3), 0.8)
    return sample


def paint_scene(background: np.ndarray, figures: Sequence[Figure],
                skeleton: Skeleton) -> SyntheticImage:
    """Draw ``figures`` in order (later ones in front) over a copy of ``background``.

    Figures with no pixel inside the image are left out of the annotation. Visibility: outside
    the image -> unlabelled at (0, 0); on a pixel a later figure drew over -> occluded; else
    visible.
    """
    image = background.copy()
    H, W = image.shape[:2]
    owner = np.zeros((H, W), np.uint8)
    joints, boxes = [], []
    for fig in figures:
        box = _paint_figure(fig, image, owner, len(boxes) + 1, skeleton)
        if box is not None:
            joints.append(fig.joints)
            boxes.append(box)
    keypoints = np.zeros((len(joints), skeleton.num_joints, 3), np.float32)
    for n, xy in enumerate(joints):
        inside = _in_frame(xy, H, W)
        cols = np.clip(np.floor(xy[:, 0]).astype(int), 0, W - 1)
        rows = np.clip(np.floor(xy[:, 1]).astype(int), 0, H - 1)
        covered = owner[rows, cols] > n + 1          # a later (nearer) figure drew over the joint
        keypoints[n, :, :2] = np.where(inside[:, None], xy, 0.0)
        keypoints[n, :, 2] = np.where(inside, np.where(covered, VIS_OCCLUDED, VIS_VISIBLE), VIS_UNLABELLED)
    return SyntheticImage(image=image, keypoints=keypoints,
                          boxes=np.asarray(boxes, np.float32).reshape(-1, 4), owner=owner)


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split``: independent of order and thread count."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_IDS[split], int(index)]))


# ----------------------------------------------------------------------------- data set on disk

@dataclasses.dataclass(frozen=True)
class SyntheticPaths:
    """Where a generated data set lives: AI Challenger json and image folder of each split."""
    root: str
    train_json: str
    train_images: str
    val_json: str
    val_images: str
    train_coco_json: str       # the same annotations in COCO format (dataset/convert.py)
    val_coco_json: str

    @classmethod
    def under(cls, root: str) -> "SyntheticPaths":
        j = lambda *p: os.path.join(root, *p)  # noqa: E731
        return cls(root, j("train.json"), j("train"), j("val.json"), j("val"),
                   j("train_coco.json"), j("val_coco.json"))


def image_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def render_record(seed: int, split: str, index: int, image_dir: Optional[str],
                  options: GeneratorOptions = GeneratorOptions()) -> Tuple[ImageRecord, np.ndarray]:
    """(record, uint8 RGB image) of image ``index`` of ``split``; a pure function of its arguments."""
    sample = render_image(image_rng(seed, split, index), get_skeleton("ai_challenger"), options)
    iid = image_id(split, index)
    H, W = sample.image.shape[:2]
    record = ImageRecord(
        image_id=iid,
        image_path=os.path.join(image_dir, iid + ".jpg") if image_dir else None,
        keypoints=sample.keypoints, boxes=sample.boxes,
        person_names=[f"human{n + 1}" for n in range(len(sample.boxes))], width=W, height=H)
    return record, sample.image


def _write_chunk(seed: int, split: str, indices: Sequence[int], image_dir: str,
                 options: GeneratorOptions) -> List[ImageRecord]:
    """Render and write the JPEGs of ``indices``; returns their records."""
    records = []
    for index in indices:
        record, image = render_record(seed, split, index, image_dir, options)
        ok, data = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, options.jpeg_quality])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode synthetic image {record.image_id}")
        with open(record.image_path, "wb") as f:
            f.write(data.tobytes())
        records.append(record)
    return records


def generate_synthetic_dataset(out_dir: str, num_train: int, num_val: int, seed: int = 0,
                               workers: int = 0, options: GeneratorOptions = GeneratorOptions()
                               ) -> SyntheticPaths:
    """Write a synthetic data set into ``out_dir`` and return its paths.

    Layout: ``train/`` and ``val/`` JPEG folders, ``train.json`` and ``val.json`` (AI Challenger
    format), ``train_coco.json`` and ``val_coco.json`` (converted by ``dataset/convert.py``: COCO
    has no head top or neck, so those joints are lost there), and ``COMPLETE.json`` (the
    parameters), written last: a folder without it is incomplete.

    Args:
        workers: rendering threads; 0 = one per CPU core (at most 8). The output does not
            depend on it.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got train={num_train}, val={num_val}")
    workers = workers or min(os.cpu_count() or 1, 8)
    paths = SyntheticPaths.under(out_dir)
    marker = os.path.join(out_dir, COMPLETE_MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    counts = {"train": num_train, "val": num_val}
    for split in SPLITS:
        os.makedirs(getattr(paths, f"{split}_images"), exist_ok=True)
    records = _render_splits(seed, counts, paths, workers, options)
    for split in SPLITS:
        aic = to_ai_challenger_json(records[split])
        save_json(getattr(paths, f"{split}_json"), aic)
        sizes = {r.image_id: (r.width, r.height) for r in records[split]}
        save_json(getattr(paths, f"{split}_coco_json"),
                    aic_to_coco(aic, image_sizes=sizes, source=getattr(paths, f"{split}_json")))
    save_json(marker, {"generator_version": GENERATOR_VERSION, "seed": seed, "train": num_train,
                         "val": num_val, "options": dataclasses.asdict(options)})
    return paths


def _render_splits(seed: int, counts: Dict[str, int], paths: SyntheticPaths, workers: int,
                   options: GeneratorOptions) -> Dict[str, List[ImageRecord]]:
    """Render every split with ``workers`` threads.

    Threads, not processes: OpenCV drawing and JPEG encoding and NumPy's array work release the
    GIL (2 threads render ~1.4x faster than one on 2 cores), and threads need neither a
    ``__main__`` guard in the calling script (spawn) nor a fork of a process running
    TensorFlow.
    """
    jobs = []                                   # (split, indices) chunks of ~50 images
    for split in SPLITS:
        n = counts[split]
        jobs += [(split, list(range(i, min(i + 50, n)))) for i in range(0, n, 50)]
    dirs = [getattr(paths, f"{split}_images") for split, _ in jobs]
    args = ([seed] * len(jobs), [s for s, _ in jobs], [i for _, i in jobs], dirs, [options] * len(jobs))
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        parts = list(pool.map(_write_chunk, *args))
    records: Dict[str, List[ImageRecord]] = {split: [] for split in SPLITS}
    for (split, _), part in zip(jobs, parts):
        records[split] += part
    return records


def synthetic_cache_key(seed: int, num_train: int, num_val: int) -> str:
    return f"v{GENERATOR_VERSION}_seed{seed}_train{num_train}_val{num_val}"


def ensure_synthetic_dataset(cfg, workers: int = 0) -> SyntheticPaths:
    """The synthetic data set of ``cfg.data``, generated on first use and reused afterwards.

    It lives in ``<cfg.data.synthetic_dir or ~/.cache/spm_tf2/synthetic>/<key>``, the key naming
    the generator version, seed and image counts. Generation writes into a private
    ``<key>.partial-<pid>`` folder that is renamed into place once complete, so an interrupted
    run is redone and two processes starting together (multi-worker training) do not collide.
    """
    d = cfg.data
    parent = os.path.expanduser(d.synthetic_dir or os.path.join("~", ".cache", "spm_tf2", "synthetic"))
    root = os.path.join(parent, synthetic_cache_key(d.synthetic_seed, d.synthetic_train_images,
                                                    d.synthetic_val_images))
    if os.path.exists(os.path.join(root, COMPLETE_MARKER)):
        log.info("synthetic data set: using %s", root)
        return SyntheticPaths.under(root)
    os.makedirs(parent, exist_ok=True)
    _remove_abandoned_partials(root)
    partial = f"{root}.partial-{os.getpid()}"
    log.info("synthetic data set: generating %d train + %d val images (seed %d) into %s",
             d.synthetic_train_images, d.synthetic_val_images, d.synthetic_seed, root)
    generate_synthetic_dataset(partial, d.synthetic_train_images, d.synthetic_val_images,
                               d.synthetic_seed, workers)
    if os.path.exists(os.path.join(root, COMPLETE_MARKER)):     # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    else:
        if os.path.exists(root):                                # an incomplete folder
            shutil.rmtree(root)
        os.rename(partial, root)
    log.info("synthetic data set: ready in %s", root)
    return SyntheticPaths.under(root)


def _remove_abandoned_partials(root: str) -> None:
    """Delete ``<root>.partial-<pid>`` folders whose generating process is gone."""
    parent, name = os.path.split(root)
    for entry in os.listdir(parent):
        if not entry.startswith(name + ".partial-"):
            continue
        pid = entry.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
