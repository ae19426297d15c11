"""The skeletons: the one place that knows joint names, counts, flip pairs and hierarchy.

Every other module asks a :class:`Skeleton` for joint indices, the joint count, the flip
permutation, the SPM hierarchy (parent and level of each joint), OKS sigmas and drawing colours.
Nothing else in the repository may hard-code any of these.

Hierarchy (SPM, Nie et al. 2019): level 0 is the root (a virtual joint: the person centroid or
box centre, chosen in the SPR config), level 1 the joints with the fewest degrees of freedom
(neck, shoulders, hips), then head, elbows and knees, then wrists and ankles. ``parents[j] == -1``
means joint ``j`` hangs directly from the root.

Joints that two skeletons share carry the same name, so conversions between datasets
(:func:`joint_mapping`) are made by name, never by index.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Tuple

ROOT = -1  # parent index of a joint that hangs from the (virtual) root joint

# Visibility of a joint, the one internal convention (file formats convert at their edges,
# dataset/records.py): a joint is *labelled* when its visibility is > VIS_UNLABELLED.
VIS_UNLABELLED = 0
VIS_OCCLUDED = 1
VIS_VISIBLE = 2

RGB = Tuple[int, int, int]

# Drawing colours: right side warm, left side cool, centre line green (RGB).
_RIGHT = ((255, 64, 0), (255, 128, 0), (255, 192, 0))
_LEFT = ((0, 96, 255), (0, 160, 255), (0, 224, 255))
_CENTRE = (0, 200, 80)


@dataclasses.dataclass(frozen=True)
class Skeleton:
    """A keypoint skeleton and its SPM hierarchy.

    Attributes:
        name: registry name (``ai_challenger`` or ``coco``).
        joint_names: one name per joint, in the dataset's file order.
        parents: parent joint index of each joint, ``ROOT`` (-1) for children of the root.
        flip_pairs: (left, right) index pairs swapped by a horizontal flip.
        oks_sigmas: per-joint OKS sigma (COCO convention: OKS uses ``(2 * sigma) ** 2``).
        joint_colors: RGB colour of each joint; a limb takes the colour of its child joint.
    """

    name: str
    joint_names: Tuple[str, ...]
    parents: Tuple[int, ...]
    flip_pairs: Tuple[Tuple[int, int], ...]
    oks_sigmas: Tuple[float, ...]
    joint_colors: Tuple[RGB, ...]

    def __post_init__(self):
        n = len(self.joint_names)
        for field in ("parents", "oks_sigmas", "joint_colors"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"skeleton {self.name}: {field} has {len(getattr(self, field))} "
                                 f"entries for {n} joints")
        if len(set(self.joint_names)) != n:
            raise ValueError(f"skeleton {self.name}: joint names are not unique")
        for j, p in enumerate(self.parents):
            if p != ROOT and not 0 <= p < n:
                raise ValueError(f"skeleton {self.name}: joint {j} has parent {p} out of range")
        self.levels  # raises on a cycle
        seen = set()
        for a, b in self.flip_pairs:
            if not (0 <= a < n and 0 <= b < n) or a == b or {a, b} & seen:
                raise ValueError(f"skeleton {self.name}: bad flip pair ({a}, {b})")
            seen |= {a, b}

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    @functools.cached_property
    def levels(self) -> Tuple[int, ...]:
        """Level of each joint: 1 for children of the root, 2 for their children, ..."""
        levels = []
        for j in range(self.num_joints):
            level, k = 0, j
            while k != ROOT:
                level += 1
                k = self.parents[k]
                if level > self.num_joints:
                    raise ValueError(f"skeleton {self.name}: the hierarchy has a cycle at joint {j}")
            levels.append(level)
        return tuple(levels)

    @property
    def num_levels(self) -> int:
        """Number of joint levels below the root."""
        return max(self.levels)

    @functools.cached_property
    def topological_order(self) -> Tuple[int, ...]:
        """Joint indices sorted by level (parents before children), stable within a level."""
        return tuple(sorted(range(self.num_joints), key=lambda j: self.levels[j]))

    @functools.cached_property
    def flip_index(self) -> Tuple[int, ...]:
        """Permutation ``perm`` with ``flipped[j] = original[perm[j]]`` after a horizontal flip."""
        perm = list(range(self.num_joints))
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return tuple(perm)

    @functools.cached_property
    def limbs(self) -> Tuple[Tuple[int, int], ...]:
        """(parent, child) joint pairs of the hierarchy, the root excluded; used for drawing."""
        return tuple((p, j) for j, p in enumerate(self.parents) if p != ROOT)

    def children(self, joint: int) -> Tuple[int, ...]:
        """Direct children of ``joint`` (``ROOT`` for the children of the root)."""
        return tuple(j for j, p in enumerate(self.parents) if p == joint)

    def index(self, name: str) -> int:
        try:
            return self.joint_names.index(name)
        except ValueError:
            raise KeyError(f"skeleton {self.name} has no joint named {name!r}; "
                           f"joints: {', '.join(self.joint_names)}") from None


AI_CHALLENGER = Skeleton(
    name="ai_challenger",
    joint_names=("right_shoulder", "right_elbow", "right_wrist",
                 "left_shoulder", "left_elbow", "left_wrist",
                 "right_hip", "right_knee", "right_ankle",
                 "left_hip", "left_knee", "left_ankle",
                 "head_top", "neck"),
    # root -> {neck, shoulders, hips}; neck -> head; shoulder -> elbow -> wrist; hip -> knee -> ankle
    parents=(ROOT, 0, 1,
             ROOT, 3, 4,
             ROOT, 6, 7,
             ROOT, 9, 10,
             13, ROOT),
    flip_pairs=((0, 3), (1, 4), (2, 5), (6, 9), (7, 10), (8, 11)),
    # The AI Challenger 2017 competition scorer uses delta = 2 * these values (keypoint_eval.py).
    oks_sigmas=(0.01388152, 0.01515228, 0.01057665, 0.01417709, 0.01497891, 0.01402144,
                0.03909642, 0.03686941, 0.01981803, 0.03843971, 0.03412318, 0.02415081,
                0.01291456, 0.01236173),
    joint_colors=(*_RIGHT, *_LEFT, *_RIGHT, *_LEFT, _CENTRE, _CENTRE),
)

COCO = Skeleton(
    name="coco",
    joint_names=("nose", "left_eye", "right_eye", "left_ear", "right_ear",
                 "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
                 "left_wrist", "right_wrist", "left_hip", "right_hip",
                 "left_knee", "right_knee", "left_ankle", "right_ankle"),
    # root -> {nose, shoulders, hips}; nose -> eyes -> ears; shoulder -> elbow -> wrist; hip -> knee -> ankle
    parents=(ROOT, 0, 0, 1, 2,
             ROOT, ROOT, 5, 6,
             7, 8, ROOT, ROOT,
             11, 12, 13, 14),
    flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    # pycocotools COCOeval default sigmas.
    oks_sigmas=(0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
                0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089),
    joint_colors=(_CENTRE, _LEFT[0], _RIGHT[0], _LEFT[1], _RIGHT[1],
                  _LEFT[0], _RIGHT[0], _LEFT[1], _RIGHT[1], _LEFT[2], _RIGHT[2],
                  _LEFT[0], _RIGHT[0], _LEFT[1], _RIGHT[1], _LEFT[2], _RIGHT[2]),
)

SKELETONS: Dict[str, Skeleton] = {s.name: s for s in (AI_CHALLENGER, COCO)}


def get_skeleton(name: str) -> Skeleton:
    """The registered skeleton called ``name``."""
    try:
        return SKELETONS[name]
    except KeyError:
        raise ValueError(f"unknown skeleton {name!r}; known: {', '.join(SKELETONS)}") from None


def joint_mapping(src: Skeleton, dst: Skeleton) -> Tuple[Tuple[int, int], ...]:
    """(src index, dst index) pairs of the joints both skeletons share, matched by name.

    AI Challenger <-> COCO share the twelve limb joints (shoulders, elbows, wrists, hips, knees,
    ankles). AI Challenger's head_top and neck have no COCO joint, and COCO's nose, eyes and ears
    have no AI Challenger joint: a conversion leaves those unlabelled.
    """
    return tuple((i, dst.joint_names.index(n)) for i, n in enumerate(src.joint_names)
                 if n in dst.joint_names)
