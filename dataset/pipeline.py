"""The tf.data input pipeline: records -> decoded, letterboxed, augmented pictures and their points.

The host does what only the host can (read, decode, one warp per picture); the SPR targets and
the colour augmentation are made in the training step, on the device (:func:`on_device`), so a
512x512 picture costs the host 786 KB of uint8 plus about 8 KB of points instead of 3.8 MB of
float32 target maps.

Public API
----------
``InputPipeline(cfg, mode)`` holds the records of one split (``mode`` ``"train"`` or ``"val"``),
the skip counter and builds the datasets:

* ``pipeline.dataset(batch_size=None, input_context=None, repeat=False)`` -> batches of
  ``(images, labels)``: ``images`` uint8 RGB ``[B, H, W, 3]`` before colour augmentation;
  ``labels`` = ``keypoints`` float32 ``[B, P, J, 3]`` (network-input x, y, visibility; P =
  ``max_people_per_image``, padding people unlabelled), ``boxes`` ``[B, P, 4]``, ``ignore``
  uint8 ``[B, h, w / 8]`` (output cells left out of the root loss, ``np.packbits`` order) and
  ``colour`` float32 ``[B, 2]`` (multiplier, grayscale flag). :func:`on_device` turns a batch
  into float32 pictures and the SPR target dict (``render_targets``: ``root``, ``root_weight``
  ``[B, h, w, 1]``, ``disp``, ``disp_weight`` ``[B, h, w, 2J]``; with ``--joint-heatmaps`` also
  ``heatmaps``, ``heatmap_weight`` ``[B, h, w, J]``). Training shuffles the records
  anew every epoch, augments and drops the last partial batch; validation does neither.
* ``pipeline.eval_dataset(batch_size=None, sizes=())`` -> batches of ``(images, info)`` for
  evaluation, ``images`` uint8 ``[B, H, W, 3]`` (cast on the device), ``info["index"]`` int64 ``[B]`` (index into ``pipeline.records``), ``info["letterbox"]``
  float32 ``[B, 4]`` = ``sx, sy, pad_x, pad_y`` (the form of ``Letterbox.as_array`` and
  ``letterbox_tf``) and ``info["image_hw"]`` int32 ``[B, 2]``, the decoded image size. A
  network-input point maps back to the original image as ``x = (x' - pad_x) / sx``,
  ``y = (y' - pad_y) / sy``; or rebuild the ``Letterbox`` with
  ``letterbox_params(h, w, H, W)`` and use ``dataset.letterbox.to_original``. Each of ``sizes``
  (multi-scale testing) adds the original picture letterboxed to that size
  (``info["scaled_images"]``, ``info["scaled_letterboxes"]``).
* ``pipeline.samples(indices, seed)`` -> list of :class:`Sample`: the same work for one batch
  in plain Python, with the NumPy reference encoder's targets (``sample(index, seed)``: a batch
  of one); used by tests and for looking at the data.
* ``load_records(cfg, split)`` and ``split_paths(cfg, split)`` give the records and the
  ``(annotation file, image folder)`` of a split (the scorer's reference file).
* ``pipeline.skipped``: :class:`SkipCounter` of images that could not be used (missing file,
  unreadable, corrupt JPEG, size differing from the annotation). A bad image is skipped with a
  warning (once per file), counted and replaced by the next usable record, so batches stay full;
  it never ends an epoch (``MAX_REPLACEMENTS`` unusable pictures in a row stop the run). Read
  ``skipped.count`` / ``skipped.summary()`` from the training loop.

Batch size and distribution strategies
--------------------------------------
``batch_size`` is the size of the batches *this* dataset yields; it defaults to
``cfg.data.batch_size``, the per-replica batch. So:

* one device: ``pipeline.dataset()``;
* ``strategy.experimental_distribute_dataset(ds)`` splits every batch among the replicas: build
  ``ds`` with ``batch_size=cfg.data.batch_size * strategy.num_replicas_in_sync`` (the global
  batch). Under several workers the dataset is then auto-sharded by elements (``DATA``), which
  needs the same order on every worker: set ``--deterministic``;
* ``strategy.distribute_datasets_from_function(lambda ctx: pipeline.dataset(input_context=ctx))``
  (the better choice for several workers): each input pipeline takes its shard of the records
  (``ctx.input_pipeline_id``) before any decoding, and the default per-replica batch is right.

Parallelism and determinism
---------------------------
A batch (file reads, ``cv2.imdecode`` to RGB, one imgaug call for the batch, one
``cv2.warpAffine`` per picture, padding of the points) is one ``tf.numpy_function`` mapped with
``num_parallel_calls``; OpenCV releases the GIL in decoding and warping, so the calls run side by
side, and OpenCV's own thread pool is set to ``cfg.data.opencv_threads`` (1) so that it does not
oversubscribe the cores (``tools/benchmark.py pipeline`` measures it against decoding alone).
Every training element carries an augmentation seed, and a batch is augmented with its first
element's: with ``cfg.data.deterministic`` the output order is fixed too, whatever the thread
timing.

The data position
-----------------
The training stream is a pure function of the run's data seed and of the position ``g`` of an
element in the global stream (global step ``s`` holds positions ``s * G .. s * G + G - 1``, ``G``
the global batch): pass ``g // N`` over the ``N`` records is the permutation
``tf.random.experimental.index_shuffle(seed, pass)``, and the element's augmentation seed is a
stateless draw from ``(seed, g)``. Input pipeline ``k`` of ``K`` (``input_context``) takes its
replicas' consecutive share of every global batch. So a run resumed at step ``s``
(``start_step``) computes where it is instead of replaying the stream: the same pictures in the
same order with the same augmentation as a run that was never interrupted, on the same number
of replicas; with the same global batch on another replica count the global batches hold the
same pictures (their split among replicas, and so the batches' augmentation seeds, change). The
data seed is ``cfg.data.seed`` with ``--deterministic``, otherwise drawn once per run and kept
in the checkpoint; without ``--deterministic`` tf.data may also reorder neighbouring batches.
Let iterators go (``del it``) before the interpreter exits: a tf.data iterator whose threads
are inside a Python function when Python shuts down can hang the exit.

Datasets (``cfg.data.dataset``): ``synthetic`` (generated on first use,
``dataset/synthetic.py``), ``ai_challenger`` and ``coco`` (``train_json``/``train_images``,
``val_json``/``val_images``). COCO crowds and people without a labelled keypoint are
``ignore_regions`` of the record (no root peak); with ``cfg.data.ignore_crowd`` their pixels
are rasterised (``pycocotools.mask``), warped with the picture and reduced to output cells (a
cell is ignored when more than half of it is); ``root_weight`` is zeroed there, except where a
labelled person's root Gaussian is (their supervision is never dropped).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import tensorflow as tf
from pycocotools import mask as mask_utils

from config.skeletons import VIS_UNLABELLED, Skeleton
from dataset.ai_challenger import read_ai_challenger
from dataset.augment import Augmenter, apply_colour, unlabel_outside
from dataset.coco import read_coco
from dataset.letterbox import Letterbox, letterbox_image, letterbox_params, letterbox_sizes, to_network
from dataset.records import ImageRecord, ReadStats
from dataset.synthetic import ensure_synthetic_dataset
from nets.spr import encode, encode_batch

log = logging.getLogger(__name__)

MODES = ("train", "val")
LABEL_KEYS = ("keypoints", "boxes", "ignore", "colour")
NO_COLOUR_CHANGE = np.array([1.0, 0.0], np.float32)   # multiplier 1, no grayscale
MAX_REPLACEMENTS = 20      # unusable pictures in a row before the pipeline stops
NO_USABLE_PICTURE = "have no usable picture"


# ----------------------------------------------------------------------------- records

def split_paths(cfg, split: str) -> Tuple[str, str]:
    """``(annotation file, image folder)`` of ``split`` (``train`` or ``val``).

    The annotation file is in the format of the configured data set (AI Challenger json for
    ``ai_challenger`` and ``synthetic``, COCO json for ``coco``): the reference its official
    scorer reads. The synthetic set is generated on first use.
    """
    d = cfg.data
    if split not in MODES:
        raise ValueError(f"split must be one of {MODES}, got {split!r}")
    if d.dataset == "synthetic":
        paths = ensure_synthetic_dataset(cfg)
        return getattr(paths, f"{split}_json"), getattr(paths, f"{split}_images")
    json_path, image_dir = getattr(d, f"{split}_json"), getattr(d, f"{split}_images")
    for field, value in ((f"{split}_json", json_path), (f"{split}_images", image_dir)):
        if not value:
            raise ValueError(f"--{field.replace('_', '-')} is not set: dataset {d.dataset!r} needs the annotation "
                             f"file and the image folder of the {split} split (--{split}-json FILE "
                             f"--{split}-images DIR; README, \"Training on AI Challenger and COCO\")")
    return json_path, image_dir


def load_records(cfg, split: str) -> Tuple[List[ImageRecord], ReadStats]:
    """Records of ``split`` (``train`` or ``val``; all of them: ``max_val_images`` is the
    evaluator's subset, ``utils.evaluation.Evaluator``).

    People with bad values are dropped and counted (``strict_annotations``: an error); COCO's
    training split leaves out images without a person (``keep_empty_train_images`` keeps them);
    validation keeps every image."""
    json_path, image_dir = split_paths(cfg, split)
    strict = cfg.data.strict_annotations
    if cfg.data.dataset == "coco":
        records, stats = read_coco(json_path, image_dir, cfg.skeleton, strict,
                                   keep_empty=split == "val" or cfg.data.keep_empty_train_images)
    else:
        records, stats = read_ai_challenger(json_path, image_dir, cfg.skeleton, strict)
    return records, stats


# ----------------------------------------------------------------------------- skipped images

class ImageError(Exception):
    """An image file that cannot be used; ``reason`` is the short counter key."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        super().__init__(f"{path}: {reason}{': ' + detail if detail else ''}")
        self.path, self.reason = path, reason


class SkipCounter:
    """Images the pipeline skipped, by reason; updated from tf.data's threads.

    ``count`` counts skips (a bad file is skipped again every epoch); ``files`` the distinct bad
    files. Each bad file is logged once as a warning.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.by_reason: Dict[str, int] = {}
        self.files: Dict[str, str] = {}

    def add(self, error: ImageError) -> None:
        with self._lock:
            self.by_reason[error.reason] = self.by_reason.get(error.reason, 0) + 1
            first = error.path not in self.files
            self.files[error.path] = error.reason
        if first:
            log.warning("skipping image %s", error)

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self.by_reason.values())

    def summary(self) -> str:
        with self._lock:
            if not self.by_reason:
                return "no image skipped"
            return (f"skipped {sum(self.by_reason.values())} images ({len(self.files)} files): " +
                    ", ".join(f"{k}: {v}" for k, v in sorted(self.by_reason.items())))


def read_image(path: Optional[str], expected_hw: Optional[Tuple[Optional[int], Optional[int]]] = None,
               rgb: bool = False) -> np.ndarray:
    """uint8 BGR (``rgb``: RGB, decoded so) ``[h, w, 3]`` of an image file; ImageError when it
    cannot be used.

    Which pixels (the one rule, also kept by the SavedModel: ``dataset.exif``): a photo as a
    viewer shows it, its EXIF orientation applied, except when the annotation gives the
    picture's size (``expected_hw``, COCO's ``width``/``height``) and the stored pixels have that
    size: then the stored pixels, which the annotation's coordinates refer to. A picture whose
    size matches neither is an ImageError ("size differs from the annotation")."""
    if not path:
        raise ImageError(str(path), "no image path")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError(path, "missing file") from None
    except OSError as e:
        raise ImageError(path, "unreadable file", e.strerror or str(e)) from None
    flag = cv2.IMREAD_COLOR_RGB if rgb else cv2.IMREAD_COLOR
    buffer = np.frombuffer(data, np.uint8)
    annotated = expected_hw is not None and None not in expected_hw
    image = cv2.imdecode(buffer, flag | cv2.IMREAD_IGNORE_ORIENTATION if annotated else flag) if data else None
    if image is None:
        raise ImageError(path, "corrupt image", "OpenCV cannot decode it")
    if annotated and tuple(image.shape[:2]) != tuple(expected_hw):
        shown = cv2.imdecode(buffer, flag)              # the annotation may refer to the viewer's pixels
        if shown is None or tuple(shown.shape[:2]) != tuple(expected_hw):
            raise ImageError(path, "size differs from the annotation",
                             f"{image.shape[1]}x{image.shape[0]} on disk, "
                             f"{expected_hw[1]}x{expected_hw[0]} annotated")
        image = shown
    return image


def read_rgb(path: str) -> np.ndarray:
    """uint8 RGB image of ``path``; ImageError naming the file when it cannot be used."""
    return read_image(path, rgb=True)


def ignore_mask(regions: Sequence[Any], height: int, width: int) -> np.ndarray:
    """bool ``[height, width]``: union of COCO segmentations (polygons, RLE or compressed RLE)."""
    mask = np.zeros((height, width), bool)
    for seg in regions:
        if isinstance(seg, list):                              # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):   # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, height, width)
        else:                                                   # compressed RLE
            rle = seg
        mask |= mask_utils.decode(rle).astype(bool)
    return mask


# ----------------------------------------------------------------------------- one sample

@dataclasses.dataclass
class Sample:
    """One prepared sample (network-input coordinates throughout).

    Attributes:
        image: uint8 RGB ``[H, W, 3]``.
        keypoints: float32 ``[N, J, 3]`` after letterbox and augmentation; joints outside the
            input are unlabelled, unlabelled joints are at (0, 0).
        boxes: float32 ``[N, 4]``.
        targets: the SPR target dict of ``nets.spr.encode``.
        letterbox: the letterbox of the original image.
        flipped: whether augmentation mirrored the sample.
        colour: float32 [2] colour augmentation (multiplier, grayscale flag) that the training
            step applies (``dataset.augment.apply_colour``); ``image`` is the picture before it.
    """
    image: np.ndarray
    keypoints: np.ndarray
    boxes: np.ndarray
    targets: Dict[str, np.ndarray]
    letterbox: Letterbox
    flipped: bool
    colour: np.ndarray = dataclasses.field(default_factory=lambda: NO_COLOUR_CHANGE.copy())


class InputPipeline:
    """Records of one split and the tf.data pipelines over them (see the module docstring).

    Args:
        cfg: the resolved config.
        mode: ``"train"`` (shuffled, augmented when ``cfg.augment.augment``) or ``"val"``.
        records: use these records instead of reading the configured split.
    """

    def __init__(self, cfg, mode: str, records: Optional[Sequence[ImageRecord]] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.cfg, self.mode = cfg, mode
        self.read_stats: Optional[ReadStats] = None
        if records is None:
            records, self.read_stats = load_records(cfg, mode)
        self.records: List[ImageRecord] = list(records)
        if not self.records:
            raise ValueError(f"the {mode} split of dataset {cfg.data.dataset!r} has no images")
        self.skeleton: Skeleton = cfg.skeleton
        self.input_hw = (cfg.data.input_height, cfg.data.input_width)
        self.output_hw = cfg.output_shape
        self.skipped = SkipCounter()
        # The data seed: the configured one with --deterministic, otherwise drawn once here (the
        # training loop passes its checkpointed one instead, so a resume continues the stream).
        self.seed = int(cfg.data.seed) if cfg.data.deterministic else fresh_data_seed()
        # tf.data runs the per-image work on its own threads; OpenCV's thread pool on top of
        # them would oversubscribe the cores (cfg.data.opencv_threads; 0 keeps OpenCV's default).
        if cfg.data.opencv_threads > 0:
            cv2.setNumThreads(cfg.data.opencv_threads)
        self.augmenter = None
        if mode == "train" and cfg.augment.augment:
            self.augmenter = Augmenter(cfg.augment, self.skeleton)
        slots = cfg.data.max_people_per_image
        crowded = [r.image_id for r in self.records if len(r.keypoints) > slots]
        if crowded and mode == "train":
            log.warning("%d %s images have more than max_people_per_image = %d people (first: %s); "
                        "training keeps the first %d of each (raise --max-people-per-image to keep all)",
                        len(crowded), mode, slots, ", ".join(crowded[:5]), slots)

    def __len__(self) -> int:
        return len(self.records)

    def check_readable(self) -> None:
        """Decode one picture of the split (the first usable of its first ``MAX_REPLACEMENTS``
        records): a ValueError naming the folder when none is usable, so that a wrong image
        folder stops a run before its first step rather than at its first evaluation."""
        errors = []
        for record in self.records[:MAX_REPLACEMENTS]:
            try:
                read_image(record.image_path, (record.height, record.width))
                return
            except ImageError as e:
                errors.append(e)
        if errors:
            folder = os.path.dirname(self.records[0].image_path or "") or "."
            raise ValueError(f"the {self.mode} split's first {len(errors)} pictures cannot be used "
                             f"(first: {errors[0]}): is the {self.mode} image folder {folder} right "
                             f"(--{self.mode}-images)?")

    # ------------------------------------------------------------------ Python side

    def _read(self, index: int):
        """``(rgb, letterbox, keypoints, boxes, ignore mask or None)`` of record ``index``, the
        points in network-input coordinates, the mask at the picture's size; ImageError when the
        picture is unusable."""
        record = self.records[index]
        rgb = read_image(record.image_path, (record.height, record.width), rgb=True)
        lb = letterbox_params(rgb.shape[0], rgb.shape[1], *self.input_hw)
        keypoints = record.keypoints.copy()
        keypoints[..., :2] = to_network(keypoints[..., :2], lb)
        boxes = to_network(record.boxes.reshape(-1, 2, 2), lb).reshape(-1, 4).astype(np.float32)
        full_mask = None
        if self.cfg.data.ignore_crowd and record.ignore_regions:
            full_mask = ignore_mask(record.ignore_regions, lb.src_h, lb.src_w)
        return rgb, lb, keypoints, boxes, full_mask

    def _read_or_replace(self, index: int):
        """:meth:`_read` of record ``index`` or, when its picture is unusable (counted in
        ``skipped`` and logged once per file), of the next usable record."""
        tries = min(len(self.records), MAX_REPLACEMENTS)
        for k in range(tries):
            try:
                return self._read((index + k) % len(self.records))
            except ImageError as e:
                self.skipped.add(e)
        raise ValueError(f"{tries} records in a row from {self.records[index].image_path!r} {NO_USABLE_PICTURE} "
                         f"({self.skipped.summary()}): is the image folder right?")

    def _prepare_batch(self, indices: Sequence[int], seed: int, replace: bool,
                       out: Optional[np.ndarray] = None):
        """``(rgb, keypoints, boxes, ignore cells or None, letterbox, flipped, colour)`` per
        record (the picture before colour augmentation, ``colour`` its parameters): one
        augmentation call for the batch (``Augmenter.augment_batch``, a pure function of the
        records and ``seed``). ``out``: uint8 [B, H, W, 3] the pictures are written into."""
        reads = [self._read_or_replace(int(i)) if replace else self._read(int(i)) for i in indices]
        if self.augmenter is not None:          # letterbox and augmentation: one warp per picture
            outs = self.augmenter.augment_batch([r[0] for r in reads], [r[2] for r in reads],
                                                [r[3] for r in reads], int(seed),
                                                [r[4] for r in reads], [r[1] for r in reads], out=out)
            items = [(o.image, o.keypoints, o.boxes, o.mask, r[1], o.flipped, o.colour) for o, r in zip(outs, reads)]
        else:
            items = []
            for rgb, lb, keypoints, boxes, full_mask in reads:
                mask = None
                if full_mask is not None:
                    mask = letterbox_image(full_mask.astype(np.uint8) * 255, lb) >= 128
                image = letterbox_image(rgb, lb)
                if out is not None:
                    out[len(items)] = image
                items.append((image, unlabel_outside(keypoints, *self.input_hw),
                              boxes, mask, lb, False, NO_COLOUR_CHANGE.copy()))
        h, w = self.output_hw
        prepared = []
        for image, keypoints, boxes, mask, lb, flipped, colour in items:
            ignore = None
            if mask is not None:
                ignore = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0.5
            prepared.append((image, keypoints, boxes, ignore, lb, flipped, colour))
        return prepared

    def samples(self, indices: Sequence[int], seed: int = 0) -> List[Sample]:
        """Prepare the records ``indices`` as one batch with augmentation ``seed``, targets by
        the NumPy reference encoder: exactly what :meth:`dataset` yields for that batch, with
        the targets the training step renders from its labels. ImageError when a picture is
        unusable."""
        result = []
        for image, keypoints, boxes, ignore, lb, flipped, colour in self._prepare_batch(indices, seed, replace=False):
            targets = encode(keypoints, boxes, self.skeleton, self.cfg.spr, self.input_hw)
            if ignore is not None:
                targets["root_weight"][ignore[..., None] & (targets["root"] <= 0)] = 0.0
            result.append(Sample(image, keypoints, boxes, targets, lb, flipped, colour))
        return result

    def sample(self, index: int, seed: int = 0) -> Sample:
        """:meth:`samples` of one record (a batch of one)."""
        return self.samples([index], seed)[0]

    def _train_batch(self, indices, seeds):
        """numpy_function body: images [B, H, W, 3], keypoints [B, P, J, 3], boxes [B, P, 4],
        packed ignore [B, h, w/8], colour [B, 2]; the batch's augmentation seed is its first
        element's."""
        count = len(indices)
        images = np.empty((count, *self.input_hw, 3), np.uint8)
        items = self._prepare_batch(indices, int(seeds[0]), replace=True, out=images)
        keypoints, boxes, packed = (np.repeat(x[None], count, axis=0) for x in self._empty_labels())
        colour = np.stack([item[6] for item in items]).astype(np.float32)
        for b, (_, kps, bxs, ignore, _, _, _) in enumerate(items):
            # People with no labelled joint (all inside the input after augmentation) encode
            # nothing: they take no slot. More than P: the first P (logged at construction).
            people = np.flatnonzero((kps[..., 2] > VIS_UNLABELLED).any(axis=1))[:keypoints.shape[1]]
            keypoints[b, :len(people)] = kps[people]
            boxes[b, :len(people)] = bxs[people]
            if ignore is not None:
                packed[b] = np.packbits(ignore, axis=1)
        return images, keypoints, boxes, packed, colour

    def _empty_labels(self):
        h, w = self.output_hw
        p, j = self.cfg.data.max_people_per_image, self.skeleton.num_joints
        return (np.zeros((p, j, 3), np.float32), np.zeros((p, 4), np.float32),
                np.zeros((h, (w + 7) // 8), np.uint8))

    def _eval_element(self, index, sizes=()):
        """numpy_function body: (image, letterbox [4], image_hw [2], ok, then per extra input
        size of multi-scale testing its image and letterbox [S, 4], each from the original)."""
        try:
            record = self.records[int(index)]
            rgb = read_image(record.image_path, (record.height, record.width), rgb=True)
        except ImageError as e:
            self.skipped.add(e)
            return (np.zeros((*self.input_hw, 3), np.uint8), np.zeros(4, np.float32), np.zeros(2, np.int32), False,
                    *[np.zeros((int(h), int(w), 3), np.uint8) for h, w in sizes],
                    np.zeros((len(sizes), 4), np.float32))
        (image, lb), *scaled = letterbox_sizes(rgb, [self.input_hw, *sizes])
        return (image, lb.as_array(), np.array([lb.src_h, lb.src_w], np.int32), True, *[x for x, _ in scaled],
                np.array([box.as_array() for _, box in scaled], np.float32).reshape(len(sizes), 4))

    # ------------------------------------------------------------------ tf.data

    def element_indices_and_seeds(self, input_context=None, repeat: bool = False, start_step: int = 0,
                                  seed: Optional[int] = None, batch_size: Optional[int] = None):
        """The ``(record index, augmentation seed)`` stream that :meth:`dataset` batches and maps
        over (a batch is augmented with its first element's seed); see "The data position".

        Args:
            input_context: the ``tf.distribute.InputContext`` of this input pipeline (None: one).
            repeat: pass after pass forever; otherwise the rest of the first pass.
            start_step: global steps already consumed (a resumed run): the stream starts where
                a run from step 0 would be after ``start_step`` steps, without reading anything.
            seed: the run's data seed (None: :attr:`seed`).
            batch_size: the per-replica batch (None: ``cfg.data.batch_size``).
        """
        n = len(self.records)
        if n == 0:
            raise ValueError(f"the {self.mode} split has no records")
        seed = self.seed if seed is None else int(seed)
        batch = int(batch_size or self.cfg.data.batch_size)
        pipelines = input_context.num_input_pipelines if input_context is not None else 1
        pipeline_id = input_context.input_pipeline_id if input_context is not None else 0
        replicas = input_context.num_replicas_in_sync if input_context is not None else 1
        local = batch * max(1, replicas // pipelines)           # elements per global step here
        global_batch = batch * replicas
        shuffle = self.mode == "train"

        def position(t):
            """Local element ``t`` -> its position in the global stream."""
            return (start_step + t // local) * global_batch + pipeline_id * local + t % local

        def element(g):
            pass_, i = g // n, g % n
            index = i
            if shuffle:
                index = tf.random.experimental.index_shuffle(
                    i, tf.stack([tf.constant(seed, tf.int64), 2 * pass_]), tf.constant(n - 1, tf.int64))
            aug = tf.random.stateless_uniform([], tf.stack([tf.constant(seed, tf.int64), 2 * g + 1]),
                                              minval=0, maxval=2 ** 62, dtype=tf.int64)
            return index, aug

        stream = tf.data.Dataset.range(2 ** 62).map(position)
        if not repeat:
            stream = stream.take_while(lambda g: g < n)
        return stream.map(element)

    def dataset(self, batch_size: Optional[int] = None, input_context=None, repeat: bool = False,
                start_step: int = 0, seed: Optional[int] = None):
        """Batches of ``(images, targets)``; see the module docstring for ``batch_size``.

        Args:
            batch_size: size of the yielded batches; None = ``cfg.data.batch_size``.
            input_context: a ``tf.distribute.InputContext`` (``distribute_datasets_from_function``):
                this pipeline takes its share of every global batch.
            repeat: pass after pass forever (a new order and new augmentation every pass);
                otherwise the (rest of the) first pass.
            start_step: global steps already consumed (resume), skipped on the index stream.
            seed: the run's data seed (None: :attr:`seed`).
        """
        train = self.mode == "train"
        batch_size = int(batch_size or self.cfg.data.batch_size)
        rows = batch_size if train else None
        h, w = self.input_hw
        shapes = [(rows, h, w, 3), *((rows, *x.shape) for x in self._empty_labels()), (rows, 2)]

        def prepare(indices, seeds):
            out = tf.numpy_function(self._train_batch, [indices, seeds],
                                    [tf.uint8, tf.float32, tf.float32, tf.uint8, tf.float32],
                                    name="prepare_batch")
            for t, shape in zip(out, shapes):
                t.set_shape(shape)
            return out[0], dict(zip(LABEL_KEYS, out[1:]))

        ds = self.element_indices_and_seeds(input_context, repeat, start_step, seed, batch_size)
        ds = ds.batch(batch_size, drop_remainder=train)
        ds = ds.map(prepare, **self._map_kwargs())
        return self._finish(ds, input_context)

    def eval_dataset(self, batch_size: Optional[int] = None, sizes: Sequence[Tuple[int, int]] = ()):
        """Batches of ``(images, info)`` in record order, for evaluation (module docstring).

        ``images`` stay uint8 (the consumer casts them on its device: a quarter of the bytes of
        float32). ``sizes``: further network input sizes (multi-scale testing); each picture is
        then also letterboxed from the original to each of them, in ``info["scaled_images"]``
        (a tuple of uint8 batches) and ``info["scaled_letterboxes"]`` [B, S, 4].
        """
        batch_size = int(batch_size or self.cfg.data.batch_size)
        h, w = self.input_hw
        sizes = [(int(a), int(b)) for a, b in sizes]

        def prepare(index):
            out = tf.numpy_function(lambda i: self._eval_element(i, sizes), [index],
                                    [tf.uint8, tf.float32, tf.int32, tf.bool] + [tf.uint8] * len(sizes) + [tf.float32],
                                    name="prepare_eval_image")
            image, lb, hw, ok = out[:4]
            image.set_shape((h, w, 3))
            lb.set_shape((4,))
            hw.set_shape((2,))
            ok.set_shape(())
            info = {"index": index, "letterbox": lb, "image_hw": hw}
            if sizes:
                for x, size in zip(out[4:-1], sizes):
                    x.set_shape((*size, 3))
                out[-1].set_shape((len(sizes), 4))
                info.update(scaled_images=tuple(out[4:-1]), scaled_letterboxes=out[-1])
            return image, info, ok

        ds = tf.data.Dataset.range(len(self.records))
        ds = ds.map(prepare, num_parallel_calls=self._parallel(), deterministic=True)
        ds = ds.filter(_is_ok).map(_drop_ok)
        ds = ds.batch(batch_size)
        return self._finish(ds, None)

    def _parallel(self) -> int:
        n = self.cfg.data.num_parallel_calls
        return tf.data.AUTOTUNE if n < 0 else max(1, n)

    def _map_kwargs(self) -> Dict[str, Any]:
        return {"num_parallel_calls": self._parallel(), "deterministic": bool(self.cfg.data.deterministic)}

    def _finish(self, ds, input_context):
        options = tf.data.Options()
        options.deterministic = bool(self.cfg.data.deterministic) or self.mode != "train"
        # Sharding is done on the record indices (input_context) or by elements (several workers
        # under experimental_distribute_dataset); there are no files to shard.
        policy = tf.data.experimental.AutoShardPolicy
        options.experimental_distribute.auto_shard_policy = (
            policy.OFF if input_context is not None else policy.DATA)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def fresh_data_seed() -> int:
    """A random data seed (a run without --deterministic draws one and keeps it in its checkpoint)."""
    return int(np.random.SeedSequence().entropy % (2 ** 31 - 1))


def _is_ok(image, labels, ok):
    return ok


def _drop_ok(image, labels, ok):
    return image, labels


# ----------------------------------------------------------------------------- errors

def input_error_message(error: Exception) -> Optional[str]:
    """The pipeline's own message when ``error`` (a TensorFlow error raised through tf.data from
    a batch function) is the pipeline giving up on unusable pictures; None otherwise."""
    for line in str(getattr(error, "message", error)).splitlines():
        if NO_USABLE_PICTURE in line:
            return line.split("ValueError: ", 1)[-1].strip()
    return None


# ----------------------------------------------------------------------------- targets

def on_device(images, labels: Dict[str, Any], cfg) -> Tuple[Any, Dict[str, Any]]:
    """What the training step does with a batch of :meth:`InputPipeline.dataset`: the float32
    pictures after colour augmentation (``dataset.augment.apply_colour``) and the SPR targets
    (:func:`render_targets`)."""
    return apply_colour(images, labels["colour"]), render_targets(labels, cfg)


def render_targets(labels: Dict[str, Any], cfg) -> Dict[str, Any]:
    """SPR targets of a batch of :meth:`InputPipeline.dataset` labels, in the graph.

    ``labels``: ``keypoints`` [B, P, J, 3], ``boxes`` [B, P, 4], ``ignore`` [B, h, w/8] bits of
    the output cells to leave out of the root loss (``np.packbits`` order, first cell in the
    high bit). Returns the dict of ``nets.spr.encode_batch`` (with the joint heatmaps when
    ``cfg.model.joint_heatmaps``); the training step calls this on
    the device, so the host ships images and points only.
    """
    packed = tf.cast(labels["ignore"], tf.int32)
    shifts = tf.constant([7, 6, 5, 4, 3, 2, 1, 0], tf.int32)
    bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(packed[..., None], shifts), 1)
    h, w = cfg.output_shape
    ignore = tf.reshape(bits, [tf.shape(packed)[0], h, -1])[:, :, :w] > 0
    return encode_batch(labels["keypoints"], labels["boxes"], cfg.skeleton, cfg.spr,
                        (cfg.data.input_height, cfg.data.input_width), ignore=ignore,
                        heatmaps=cfg.model.joint_heatmaps)
