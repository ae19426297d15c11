"""``python3 tools/benchmark.py scale``: a rehearsal of the real training splits' size.

    python3 tools/benchmark.py scale [--out DIR] [--aic-images 210000] [--aic-people 378000]
                                     [--coco-images 118000] [--coco-with-people 64000] [--batches 200]

Writes (once; reused when present) an AI Challenger training file the size of the real one,
from the example annotations (``tests/data/``) with jittered coordinates and a few injected
per-person anomalies (a negative labelled coordinate, an inverted box, a NaN, a visibility
outside the set), and a COCO file of the size of train2017 (images with people converted by
``dataset/convert.py``, the rest person-less). Every image id is a symbolic link to one of 32
synthetic pictures, so the files are real training inputs; ``aic_val.json`` and ``coco_val.json``
(200 of their images) serve as validation splits of rehearsal trainings (docs/data.md). Then, for
each file, in a fresh
process (so that the peak memory is the reader's and the pipeline's alone):

* reading time and RSS (``dataset.pipeline.load_records``, the training reader, lenient);
* the time from the start of the read to the first training batch of the preset's pipeline;
* RSS after ``--batches`` pipeline batches, and the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time
from typing import Any, Dict, List

import cv2
import numpy as np

from config import get_preset
from dataset.convert import aic_to_coco
from dataset.errors import load_json, save_json
from dataset.synthetic import generate_synthetic_dataset
from tools.benchmarks import REPO_ROOT

EXAMPLE = os.path.join(REPO_ROOT, "tests", "data", "ai_challenger_keypoint_example",
                       "keypoint_annotations_example.json")
POOL_SIZE = 32
ANOMALIES = 5        # of each kind, in each file
VAL_IMAGES = 200     # images of the small validation files for rehearsal trainings


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _aic_rehearsal(num_images: int, num_people: int, rng: np.random.Generator) -> List[Dict[str, Any]]:
    """``num_images`` entries with ``num_people`` people in all, drawn from the example file."""
    example = load_json(EXAMPLE)
    per_image = np.full(num_images, num_people // num_images)
    per_image[rng.choice(num_images, num_people - per_image.sum(), replace=False)] += 1
    entries = []
    for i, count in enumerate(per_image.tolist()):
        src = example[int(rng.integers(len(example)))]
        names = list(src["keypoint_annotations"])
        chosen = [names[k % len(names)] for k in range(count)]
        shift = rng.normal(0, 3, size=2)
        kps, boxes = {}, {}
        for n, name in enumerate(chosen):
            k = np.asarray(src["keypoint_annotations"][name], np.float64).reshape(-1, 3)
            labelled = k[:, 2] != 3
            k[labelled, :2] = np.maximum(0, np.round(k[labelled, :2] + shift + rng.normal(0, 2, (labelled.sum(), 2))))
            b = np.maximum(0, np.asarray(src["human_annotations"][name], np.float64) + np.tile(np.round(shift), 2))
            kps[f"human{n + 1}"] = k.reshape(-1).astype(int).tolist()
            boxes[f"human{n + 1}"] = b.astype(int).tolist()
        entries.append({"image_id": f"r{i:06d}", "human_annotations": boxes, "keypoint_annotations": kps})
    people = [(e, name) for e in entries[:ANOMALIES * 40:10] for name in list(e["keypoint_annotations"])[:1]]
    for k, (entry, name) in enumerate(people[:4 * ANOMALIES]):
        kind = k % 4
        if kind == 0:
            values = entry["keypoint_annotations"][name]
            j = next(j for j in range(len(values) // 3) if values[3 * j + 2] != 3)
            values[3 * j] = -7                                  # negative labelled coordinate
        elif kind == 1:
            box = entry["human_annotations"][name]
            box[0], box[2] = box[2] + 1, box[0]                 # inverted box
        elif kind == 2:
            entry["keypoint_annotations"][name][1] = float("nan")
        else:
            entry["keypoint_annotations"][name][2] = 7          # visibility outside 1-3
    return entries


def _write_val_files(paths: Dict[str, str], size: int = VAL_IMAGES) -> None:
    """``aic_val.json`` and ``coco_val.json``: ``size`` images of the training files (from the
    1000th on, past the injected anomalies: the scorer refuses a NaN in a reference), a validation
    split small enough for the end-of-run evaluation of a rehearsal training."""
    for key in ("aic", "coco"):
        path = paths[key].replace("_train.json", "_val.json")
        if os.path.exists(path):
            continue
        data = load_json(paths[key])
        if key == "aic":
            small = data[1000:1000 + size]
        else:
            images = data["images"][1000:1000 + size]
            ids = {im["id"] for im in images}
            small = dict(data, images=images, annotations=[a for a in data["annotations"] if a["image_id"] in ids])
        save_json(path, small)


def prepare(out: str, args) -> Dict[str, str]:
    """The rehearsal files and image folder under ``out`` (made once)."""
    paths = {"aic": os.path.join(out, "aic_train.json"), "coco": os.path.join(out, "coco_train.json"),
             "images": os.path.join(out, "images")}
    if all(os.path.exists(p) for p in paths.values()):
        _write_val_files(paths)
        return paths
    os.makedirs(paths["images"], exist_ok=True)
    rng = np.random.default_rng(0)
    pool = generate_synthetic_dataset(os.path.join(out, "pool"), POOL_SIZE, 0, seed=1)
    pool_files = sorted(os.path.join(pool.train_images, f) for f in os.listdir(pool.train_images))
    pool_sizes = [cv2.imread(f).shape[1::-1] for f in pool_files]
    start = time.time()
    entries = _aic_rehearsal(args.aic_images, args.aic_people, rng)
    ids = [e["image_id"] for e in entries]
    extra = [f"e{i:06d}" for i in range(max(0, args.coco_images - args.coco_with_people))]
    for i, image_id in enumerate(ids + extra):
        link = os.path.join(paths["images"], image_id + ".jpg")
        if not os.path.lexists(link):
            os.symlink(pool_files[i % POOL_SIZE], link)
    save_json(paths["aic"], entries)
    sizes = {image_id: pool_sizes[i % POOL_SIZE] for i, image_id in enumerate(ids + extra)}
    coco = aic_to_coco(entries[:args.coco_with_people], image_sizes=sizes, source=paths["aic"])
    for k, ann in enumerate(coco["annotations"][:4 * ANOMALIES]):
        kind, values = k % 4, ann["keypoints"]
        j = next((j for j in range(len(values) // 3) if values[3 * j + 2] > 0), 0)
        if kind == 0:
            values[3 * j] = -7                                  # negative labelled coordinate
        elif kind == 1:
            ann["bbox"][2] = -abs(ann["bbox"][2]) - 1            # negative width
        elif kind == 2:
            values[3 * j + 1] = float("nan")
        else:
            values[3 * j + 2] = 5                               # visibility outside 0-2
    next_id = max((im["id"] for im in coco["images"]), default=0) + 1
    for k, image_id in enumerate(extra):
        width, height = sizes[image_id]
        coco["images"].append({"id": next_id + k, "file_name": image_id + ".jpg", "width": int(width),
                               "height": int(height)})
    save_json(paths["coco"], coco)
    _write_val_files(paths)
    print(f"rehearsal files written in {time.time() - start:.1f} s: {paths['aic']} ({len(entries)} images), "
          f"{paths['coco']} ({len(coco['images'])} images)")
    return paths


def measure(dataset: str, json_path: str, images: str, batches: int, queue) -> None:
    """In a fresh process: read, first batch, ``batches`` batches; puts the numbers on ``queue``."""
    from dataset.pipeline import InputPipeline, load_records  # imported in the child: its RSS counts them

    preset = "coco_w32_512" if dataset == "coco" else "ai_challenger_w32_512"
    cfg = get_preset(preset).replace(train_json=json_path, train_images=images)
    base = _rss_mb()
    start = time.perf_counter()
    records, stats = load_records(cfg, "train")
    read_s = time.perf_counter() - start
    after_read = _rss_mb()
    pipeline = InputPipeline(cfg, "train", records)
    iterator = iter(pipeline.dataset(repeat=True))
    next(iterator)
    first_batch_s = time.perf_counter() - start
    for _ in range(batches):
        next(iterator)
    queue.put({"dataset": dataset, "images": stats.images, "people": stats.people,
               "dropped_people": stats.dropped_people, "dropped_images": stats.dropped_images,
               "read_s": round(read_s, 2), "rss_after_read_mb": round(after_read, 1),
               "rss_before_read_mb": round(base, 1), "first_batch_s": round(first_batch_s, 2),
               "batches": batches, "rss_after_batches_mb": round(_rss_mb(), 1), "peak_rss_mb": round(_peak_mb(), 1),
               "skipped_images": pipeline.skipped.count})
    del iterator


def run_benchmark(name: str, argv: List[str]) -> Dict:
    parser = argparse.ArgumentParser(prog=f"benchmark.py {name}", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.expanduser("~"), ".cache", "spm_tf2", "scale"))
    parser.add_argument("--aic-images", type=int, default=210_000)
    parser.add_argument("--aic-people", type=int, default=378_000)
    parser.add_argument("--coco-images", type=int, default=118_000)
    parser.add_argument("--coco-with-people", type=int, default=64_000)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args(argv)
    if args.coco_with_people > args.aic_images:
        raise SystemExit("--coco-with-people must not exceed --aic-images (they are drawn from it)")
    out = os.path.join(args.out, f"aic{args.aic_images}_{args.aic_people}_coco{args.coco_images}_{args.coco_with_people}")
    paths = prepare(out, args)
    context = multiprocessing.get_context("spawn")
    results = {}
    for dataset in ("ai_challenger", "coco"):
        queue = context.Queue()
        proc = context.Process(target=measure, args=(dataset, paths["coco" if dataset == "coco" else "aic"],
                                                     paths["images"], args.batches, queue))
        proc.start()
        results[dataset] = queue.get()
        proc.join()
        r = results[dataset]
        print(f"{dataset}: {r['images']} images, {r['people']} people read in {r['read_s']} s "
              f"(RSS {r['rss_before_read_mb']} -> {r['rss_after_read_mb']} MB); first batch after "
              f"{r['first_batch_s']} s; RSS after {args.batches} batches {r['rss_after_batches_mb']} MB, "
              f"peak {r['peak_rss_mb']} MB; dropped people {r['dropped_people']}, images {r['dropped_images']}")
    return {"benchmark": "scale", "cores": os.cpu_count(), **results}
