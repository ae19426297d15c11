"""What the annotation readers and writers share: the error type, JSON loading, number checks.

Every problem of *structure* in an annotation or prediction file (not JSON, wrong top level,
wrong number of values, a non-number, duplicate ids, an unknown joint layout) raises
:class:`AnnotationError` (a ``ValueError``) whose message names the file, the record (image id,
person key, joint) and the problem, so that a bad line in a 300 MB file can be found without a
debugger. A problem of *one person's values* (a NaN or infinite value, a visibility outside the
format's set, a negative coordinate on a labelled joint, an inverted box) is a
:class:`PersonProblem`: the readers drop that person, count it by reason and name the first few
in the log (:func:`settle_person_problems`), or raise as for structure with ``strict``.

The checks are written for speed on AI Challenger train (210k images, 380k people): the values of
all people are checked with one C-level pass over their Python types and then as one NumPy array;
Python only loops over values to name the culprit once a check has failed.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import os
from typing import Any, Callable, List, Optional, Sequence

import numpy as np

from config.skeletons import VIS_UNLABELLED, Skeleton
from dataset.records import ReadStats, VisibilityCode

logger = logging.getLogger(__name__)
NAMED_PROBLEMS = 5          # people named in the log per reason; the rest are counted


class AnnotationError(ValueError):
    """An annotation or prediction file (or in-memory list) that cannot be read as its format."""


def where(source: str, image_id: Any = None, person: Any = None, index: Optional[int] = None) -> str:
    """``source: image 'abc', person 'human2'`` -- the prefix of every error message."""
    parts = []
    if image_id is not None:
        parts.append(f"image {image_id!r}")
    elif index is not None:
        parts.append(f"entry {index}")
    if person is not None:
        parts.append(f"person {person!r}")
    return f"{source}: {', '.join(parts)}" if parts else str(source)


def load_json(path: str) -> Any:
    """The parsed JSON of ``path``; AnnotationError naming the file (and line, column) otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise AnnotationError(f"{path}: no such file") from None
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read the file ({e.strerror or e})") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, "
                              f"column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON: not UTF-8 text ({e.reason} at byte "
                              f"{e.start})") from None


def save_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file renamed over it)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def require_keys(obj: Any, keys: Sequence[str], what: str) -> None:
    """``obj`` must be a dict holding every key in ``keys``; ``what`` prefixes the message."""
    if not isinstance(obj, dict):
        raise AnnotationError(f"{what}: expected a JSON object, got {_json_type(obj)}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise AnnotationError(f"{what}: missing key{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(repr(k) for k in missing)}")


@functools.lru_cache(maxsize=None)
def _is_number_type(t: type) -> bool:
    # bool is an int subclass, but a JSON true/false is not a coordinate.
    return issubclass(t, (int, float, np.integer, np.floating)) and not issubclass(t, (bool, np.bool_))


def number_array(values: Any, length: int, what: str, names: Optional[Sequence[str]] = None,
                 finite: bool = True) -> np.ndarray:
    """``values`` as float64 [length]: a list of ``length`` numbers (finite ones with ``finite``),
    else AnnotationError.

    ``names`` (one per value) makes the message name the culprit, e.g. ``left_wrist y``.
    """
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise AnnotationError(f"{what}: expected a list of {length} numbers, got {_json_type(values)}")
    if len(values) != length:
        raise AnnotationError(f"{what}: expected {length} numbers, got {len(values)}")
    if not all(map(_is_number_type, set(map(type, values)))):
        i = next(i for i, v in enumerate(values) if not _is_number_type(type(v)))
        raise AnnotationError(f"{what}: {_value_name(i, names)} is {_json_type(values[i])} "
                              f"{values[i]!r}, not a number")
    array = np.asarray(values, dtype=np.float64)
    if finite and not np.isfinite(array).all():
        i = int(np.flatnonzero(~np.isfinite(array))[0])
        raise AnnotationError(f"{what}: {_value_name(i, names)} is {values[i]!r}, not a finite number")
    return array


def number_rows(rows: Sequence[Any], length: int, describe: Callable[[int], str],
                names: Optional[Sequence[str]] = None, finite: bool = True) -> np.ndarray:
    """float64 [len(rows), length] of many lists of numbers (e.g. every person of a file).

    The fast path checks every value's type in one C-level pass and converts once; only when it
    fails does :func:`number_array` go through the rows one by one to name the culprit, with
    ``describe(i)`` (built only then) naming row ``i``.
    """
    if len(rows) == 0:
        return np.zeros((0, length), np.float64)
    try:
        types = set(map(type, itertools.chain.from_iterable(rows)))
        if all(map(_is_number_type, types)):
            array = np.array(rows, dtype=np.float64)
            if array.shape == (len(rows), length) and (not finite or np.isfinite(array).all()):
                return array
    except (TypeError, ValueError):   # a row that is not a list, or rows of different lengths
        pass
    for i, row in enumerate(rows):
        number_array(row, length, describe(i), names, finite)
    raise AnnotationError(f"{describe(0)}: malformed list of numbers")   # not reached


def _value_name(i: int, names: Optional[Sequence[str]]) -> str:
    return f"{names[i]} (value {i})" if names is not None else f"value {i}"


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, float) and not math.isfinite(v):
        return "a non-finite number"
    return type(v).__name__


def json_numbers(values: np.ndarray, decimals: int = 3) -> list:
    """``values`` as nested Python lists for ``json.dump``: ints when every value is integral.

    Annotation files hold integer pixels; writing ``123`` rather than ``123.0`` keeps converted
    files in the style (and size) of the originals. Other values are rounded to ``decimals``
    places, below the float32 precision of the records at image-sized coordinates.
    """
    values = np.asarray(values, dtype=np.float64)
    if np.array_equal(values, np.round(values)):
        return values.astype(np.int64).tolist()
    return np.round(values, decimals).tolist()


@dataclasses.dataclass
class PersonProblem:
    """People of a file with one kind of bad value: ``mask`` bool [people];
    ``describe(row)`` is the message for one of them (file, image, person, joint, value)."""
    reason: str
    mask: np.ndarray
    describe: Callable[[int], str]


def _first_joint(bad: np.ndarray, n: int) -> int:
    return int(np.flatnonzero(bad[n])[0])


def _non_finite(values: np.ndarray, names: Sequence[str], what: Callable[[int], str]) -> Callable[[int], str]:
    """Message maker for a row of ``values`` [people, V] with a non-finite value."""
    def describe(n: int) -> str:
        i = int(np.flatnonzero(~np.isfinite(values[n]))[0])
        return f"{what(n)}: {names[i]} (value {i}) is {float(values[n, i])}, not a finite number"
    return describe


def keypoint_problems(keypoints: np.ndarray, person: Callable[[int], str], skeleton: Skeleton,
                      code: VisibilityCode) -> List[PersonProblem]:
    """The value checks every format shares, as arrays over all people of a file: finite values,
    visibility in the format's set, non-negative coordinates on labelled joints. ``keypoints`` is
    [people, J, 3] as in the file; ``person(row)`` names a row in the messages."""
    names, vis = skeleton.joint_names, keypoints[..., 2]
    non_finite = ~np.isfinite(keypoints).all(axis=-1)
    bad_vis = code.invalid(vis) & ~non_finite
    negative = (vis != code.unlabelled) & (keypoints[..., :2] < 0).any(axis=-1) & ~non_finite & ~bad_vis
    return [
        PersonProblem("non-finite keypoint value", non_finite.any(axis=1),
                      _non_finite(keypoints.reshape(len(keypoints), 3 * len(names)), keypoint_value_names(names),
                                  lambda n: f"{person(n)}: keypoints")),
        PersonProblem("visibility outside the format's set", bad_vis.any(axis=1), lambda n: (
            f"{person(n)}: {names[_first_joint(bad_vis, n)]} has visibility "
            f"{vis[n, _first_joint(bad_vis, n)]:g}; {code.format} uses {code.describe()}")),
        PersonProblem("negative coordinate on a labelled joint", negative.any(axis=1), lambda n: (
            f"{person(n)}: labelled joint {names[_first_joint(negative, n)]} has a negative coordinate "
            f"({keypoints[n, _first_joint(negative, n), 0]:g}, {keypoints[n, _first_joint(negative, n), 1]:g})")),
    ]


def box_problems(file_boxes: np.ndarray, names: Sequence[str], inverted: np.ndarray, inverted_text: str,
                 person: Callable[[int], str]) -> List[PersonProblem]:
    """Non-finite values and inverted boxes; ``file_boxes`` [people, 4] as the file writes them
    (value ``names``), ``inverted`` bool [people] (a negative width or height, which
    ``inverted_text`` says in the file's terms)."""
    non_finite = ~np.isfinite(file_boxes).all(axis=1)
    return [PersonProblem("non-finite box value", non_finite,
                          _non_finite(file_boxes, names, lambda n: f"{person(n)}: box")),
            PersonProblem("inverted box", inverted & ~non_finite, lambda n: (
                f"{person(n)}: box {json_numbers(file_boxes[n])} has {inverted_text}"))]


def settle_person_problems(problems: Sequence[PersonProblem], num_people: int, stats: ReadStats,
                           strict: bool) -> np.ndarray:
    """bool [people]: the people with none of ``problems``.

    ``strict``: the first problem raises AnnotationError. Otherwise each problem's people are
    dropped and counted in ``stats`` by reason, and the first few of each reason are named in a
    warning (a person with several problems is counted under the first).
    """
    bad = np.zeros(num_people, bool)
    for problem in problems:
        rows = np.flatnonzero(problem.mask & ~bad)
        if not len(rows):
            continue
        if strict:
            raise AnnotationError(problem.describe(int(rows[0])))
        stats.drop_people(problem.reason, len(rows))
        named = "; ".join(problem.describe(int(r)) for r in rows[:NAMED_PROBLEMS])
        more = f" (and {len(rows) - NAMED_PROBLEMS} more)" if len(rows) > NAMED_PROBLEMS else ""
        logger.warning("%s: dropped %d %s (%s): %s%s (--strict-annotations makes this an error)",
                       stats.source, len(rows), "person" if len(rows) == 1 else "people", problem.reason,
                       named, more)
        bad |= problem.mask
    return ~bad


def keypoint_lists(keypoints: np.ndarray, code: VisibilityCode) -> list:
    """One flat ``[x, y, v] * J`` list per person, in a file's visibility convention.

    Args:
        keypoints: [people, J, 3] in the internal convention (``dataset/records.py``).
        code: the file format's visibility code.

    Unlabelled joints are written at ``0, 0``; visibilities are ints, coordinates as
    :func:`json_numbers` (ints when every coordinate of ``keypoints`` is integral).
    """
    vis = keypoints[..., 2].astype(np.int64)
    xy = np.where((vis > VIS_UNLABELLED)[..., None], keypoints[..., :2], 0.0)
    file_vis = code.to_file(vis)
    rows = np.concatenate([xy, file_vis[..., None]], axis=-1).reshape(len(keypoints), 3 * keypoints.shape[1])
    if np.array_equal(xy, np.round(xy)):
        return rows.astype(np.int64).tolist()
    rows = np.round(rows, 3).tolist()
    for row, v in zip(rows, file_vis.tolist()):
        row[2::3] = v
    return rows


@functools.lru_cache(maxsize=None)
def keypoint_value_names(joint_names: Sequence[str]) -> tuple:
    """``('right_shoulder x', 'right_shoulder y', 'right_shoulder v', ...)``: names of a flat list."""
    return tuple(f"{j} {c}" for j in joint_names for c in ("x", "y", "v"))
