"""Benchmarks: ``python3 tools/benchmark.py {oracle,decode,encoder,model,pipeline,infer,train,scale,multiscale,sizes,curve,recipe,gpu} [options]``.

The measurement code lives in ``tools/benchmarks/`` (one module per subject, importing the
library, never imported by it); this script only dispatches. Every subcommand prints its
findings and, as its last line, one JSON object.
"""

import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SUBCOMMANDS = {
    "oracle": ("tools.benchmarks.spr", "encode-decode round trip of ground truth, scored officially"),
    "decode": ("tools.benchmarks.spr", "decoder ms per image on realistic noisy maps"),
    "encoder": ("tools.benchmarks.spr", "the TF encoder against the NumPy reference on every image"),
    "model": ("tools.benchmarks.model", "parameters, conv MACs, forward and train-step time"),
    "pipeline": ("tools.benchmarks.pipeline", "images/s through the training input pipeline"),
    "infer": ("tools.benchmarks.infer", "end-to-end images/s of model_val"),
    "train": ("tools.benchmarks.train", "ms per training step with 1 and N steps per tf.function call"),
    "scale": ("tools.benchmarks.scale", "reading, first batch and memory at the real data sets' size"),
    "multiscale": ("tools.benchmarks.multiscale", "multi-scale testing on shrunk validation pictures (small people)"),
    "sizes": ("tools.benchmarks.sizes", "a trained model at twice its input size; decoder thresholds"),
    "curve": ("tools.benchmarks.curve", "training loss every N steps from fixed weights, deterministic data"),
    "recipe": ("tools.benchmarks.recipe", "a preset's recipe rehearsed at its geometry: score curve per variant"),
    "gpu": ("tools.benchmarks.gpu", "training and inference images/s on a GPU, per precision, batch, XLA and feed"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print(__doc__.strip())
        for name, (_, what) in SUBCOMMANDS.items():
            print(f"  {name:10s} {what}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    # Imported on demand: each subcommand loads only what it measures (TensorFlow, the data set).
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    result = module.run_benchmark(argv[0], argv[1:])
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
