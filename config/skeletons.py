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
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
        name: registry name (``ai_challenger``, ``coco``, ``crowdpose``, ``ochuman``), or the
            name of a skeleton derived from a data set's file (:func:`derive_skeleton`).
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

    def to_dict(self) -> Dict[str, Any]:
        """The skeleton as JSON-ready data (a run's config.json keeps a derived skeleton so)."""
        return {"name": self.name, "joint_names": list(self.joint_names), "parents": list(self.parents),
                "flip_pairs": [list(p) for p in self.flip_pairs], "oks_sigmas": list(self.oks_sigmas),
                "joint_colors": [list(c) for c in self.joint_colors]}

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "skeleton") -> "Skeleton":
        try:
            return cls(name=str(d["name"]), joint_names=tuple(str(n) for n in d["joint_names"]),
                       parents=tuple(int(p) for p in d["parents"]),
                       flip_pairs=tuple((int(a), int(b)) for a, b in d["flip_pairs"]),
                       oks_sigmas=tuple(float(v) for v in d["oks_sigmas"]),
                       joint_colors=tuple((int(r), int(g), int(b)) for r, g, b in d["joint_colors"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: not a skeleton ({type(e).__name__}: {e})") from None

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

CROWDPOSE = Skeleton(
    name="crowdpose",
    # CrowdPose's own order and names (its annotation files' category)
    joint_names=("left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
                 "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
                 "head", "neck"),
    # as AI Challenger's: root -> {neck, shoulders, hips}; neck -> head
    parents=(ROOT, ROOT, 0, 1, 2, 3,
             ROOT, ROOT, 6, 7, 8, 9,
             13, ROOT),
    flip_pairs=((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)),
    # CrowdPose's evaluation (crowdposetools): COCO's limb sigmas, 0.079 for head and neck
    oks_sigmas=(0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
                0.079, 0.079),
    joint_colors=(_LEFT[0], _RIGHT[0], _LEFT[1], _RIGHT[1], _LEFT[2], _RIGHT[2],
                  _LEFT[0], _RIGHT[0], _LEFT[1], _RIGHT[1], _LEFT[2], _RIGHT[2], _CENTRE, _CENTRE),
)

# OCHuman annotates COCO's 17 joints and is scored with COCO's sigmas.
OCHUMAN = dataclasses.replace(COCO, name="ochuman")

SKELETONS: Dict[str, Skeleton] = {s.name: s for s in (AI_CHALLENGER, COCO, CROWDPOSE, OCHUMAN)}

# ----------------------------------------------------------------------------- derived skeletons

log = logging.getLogger(__name__)

# Joints whose names say they are on the torso hang from the root (the paper's level 1: the
# fewest degrees of freedom); the rest hang from the nearest of them along the skeleton's edges.
TORSO_WORDS = ("neck", "shoulder", "hip", "thorax", "pelvis", "spine", "chest", "torso", "withers")
# OKS sigma of a joint that neither COCO nor a named skeleton knows: about the mean of COCO's 17.
DEFAULT_OKS_SIGMA = 0.07
_SIDES = (("left_", "right_"), ("l_", "r_"))


def _known_sigma(name: str) -> Optional[float]:
    for known in (COCO, CROWDPOSE):
        if name in known.joint_names:
            return known.oks_sigmas[known.joint_names.index(name)]
    return None


def _side(name: str) -> str:
    low = name.lower()
    for left, right in _SIDES:
        if low.startswith(left):
            return "left"
        if low.startswith(right):
            return "right"
    return "centre"


def _flip_pairs(names: Sequence[str], source: str) -> Tuple[Tuple[int, int], ...]:
    """(left, right) pairs from ``left_x``/``right_x`` (or ``l_x``/``r_x``) names."""
    index = {n.lower(): i for i, n in enumerate(names)}
    pairs, lonely = [], []
    for i, n in enumerate(names):
        low = n.lower()
        for left, right in _SIDES:
            for mine, other in ((left, right), (right, left)):
                if low.startswith(mine):
                    partner = other + low[len(mine):]
                    if partner not in index:
                        lonely.append(f"{n!r} has no {partner!r}")
                    elif mine == left:
                        pairs.append((i, index[partner]))
                    break
            else:
                continue
            break
    if lonely:
        raise ValueError(f"{source}: joints without their mirror joint ({'; '.join(lonely)}): a horizontal "
                         "flip would have nothing to swap them with; rename them or give the skeleton as JSON")
    return tuple(pairs)


def derive_skeleton(names: Sequence[Any], edges: Sequence[Any], source: str, name: str = "auto",
                    oks_sigmas: Optional[Sequence[float]] = None, named: bool = True) -> Skeleton:
    """The SPM skeleton of a COCO-format keypoint category (``keypoints`` names, ``skeleton``
    edges, 1-based as COCO's), rooted at the person centre.

    * names that are a named skeleton's (COCO, CrowdPose, ...) give that skeleton, its own
      hierarchy and sigmas (``named=False``: derived all the same); the file's edges are then
      not used, and edges that name joints which do not exist are logged (CrowdPose's files
      carry COCO's 17-joint edges on its 14 joints);
    * otherwise the hierarchy is a tree over the edges: the torso joints (``TORSO_WORDS`` in the
      name; the graph's centre joint when none is) hang from the root, every other joint from
      its neighbour on a shortest path to them. Flip pairs come from ``left_``/``right_`` names,
      OKS sigmas from COCO's or CrowdPose's for their joint names, else ``DEFAULT_OKS_SIGMA``
      (``oks_sigmas`` overrides), colours by side and depth.

    Raises ValueError naming ``source`` and the joints for duplicate names, edges naming joints
    that do not exist, joints no edge reaches, and ``left_x`` without ``right_x``.
    """
    names = [str(n) for n in names]
    if not names:
        raise ValueError(f"{source}: the category names no keypoints")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{source}: keypoint names appear twice: {', '.join(dupes)}")
    n = len(names)
    bad, pairs = [], []
    for e in edges or ():
        ok = (isinstance(e, (list, tuple)) and len(e) == 2 and all(isinstance(v, int) for v in e)
              and all(1 <= v <= n for v in e) and e[0] != e[1])
        (pairs.append((e[0] - 1, e[1] - 1)) if ok else bad.append(list(e) if isinstance(e, (list, tuple)) else e))
    for known in SKELETONS.values() if named else ():
        if tuple(names) == known.joint_names:
            if bad:
                log.warning("%s: the category's skeleton edges %s name joints that do not exist (%d joints, "
                            "numbered from 1); its joint names are the %s skeleton's, which is used with its "
                            "own hierarchy (the file's edges are not used)", source, bad, n, known.name)
            return known
    if bad:
        raise ValueError(f"{source}: skeleton edges {bad} name joints that do not exist (the category has {n} "
                         f"joints, numbered from 1 as in COCO); fix the edges or use a named skeleton "
                         f"({', '.join(SKELETONS)})")
    flip_pairs = _flip_pairs(names, source)
    neighbours: List[List[int]] = [[] for _ in range(n)]
    for a, b in pairs:
        neighbours[a].append(b)
        neighbours[b].append(a)
    unreached = [names[j] for j in range(n) if not neighbours[j]] if n > 1 else []
    if unreached:
        raise ValueError(f"{source}: no skeleton edge reaches the joints {', '.join(unreached)}: SPM reads every "
                         f"joint through its parent, so each needs an edge (add it to the category's 'skeleton')")
    parents = [ROOT] * n
    placed = [False] * n
    frontier = []

    def hang(seeds: List[int]) -> None:
        for j in seeds:
            placed[j] = True
        queue = list(seeds)
        while queue:
            nxt = []
            for j in queue:
                for k in sorted(neighbours[j]):
                    if not placed[k]:
                        placed[k], parents[k] = True, j
                        nxt.append(k)
            queue = nxt

    def centre(component: List[int]) -> int:
        def eccentricity(j):
            depth, seen, queue = 0, {j}, [j]
            while queue:
                queue = [k for i in queue for k in neighbours[i] if k not in seen and not seen.add(k)]
                depth += bool(queue)
            return depth
        return min(component, key=lambda j: (eccentricity(j), j))

    torso = [j for j, nm in enumerate(names) if any(w in nm.lower() for w in TORSO_WORDS)]
    hang(torso)
    while not all(placed):                       # components without a torso joint: their centre
        first = placed.index(False)
        component, queue = {first}, [first]
        while queue:
            queue = [k for i in queue for k in neighbours[i] if k not in component and not component.add(k)]
        seed = centre(sorted(component))
        frontier.append(names[seed])
        hang([seed])
    if frontier and torso:
        log.warning("%s: joints %s are not connected to the torso by any edge; each hangs from the root",
                    source, ", ".join(frontier))
    if oks_sigmas is not None and len(oks_sigmas) != n:
        raise ValueError(f"{source}: {len(oks_sigmas)} OKS sigmas for {n} joints")
    sigmas = tuple(float(v) for v in oks_sigmas) if oks_sigmas is not None else tuple(
        _known_sigma(nm) or DEFAULT_OKS_SIGMA for nm in names)
    draft = Skeleton(name, tuple(names), tuple(parents), flip_pairs, sigmas, (_CENTRE,) * n)
    shades = {"left": _LEFT, "right": _RIGHT}
    colors = tuple(shades[_side(nm)][min(level, 3) - 1] if _side(nm) in shades else _CENTRE
                   for nm, level in zip(names, draft.levels))
    skeleton = dataclasses.replace(draft, joint_colors=colors)
    log.info("%s: skeleton of %d joints derived from the category; depth below the root: %s", source, n,
             ", ".join(f"{nm} {level}" for nm, level in zip(names, skeleton.levels)))
    return skeleton


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
