"""Test processes only (tests/conftest.py puts this folder on PYTHONPATH for the pytest workers
and every process they start): TensorFlow's Grappler graph optimiser is switched off as soon as
``tensorflow`` is imported.

Why: most of the suite's time is TensorFlow preparing each trainer's first step, and Grappler is
about 40% of it (a tiny trunk's first training call 10.1 s -> 5.9 s on one device, 20.8 s ->
12.9 s on two MirroredStrategy replicas; the following steps take the same time either way:
measured on the 2-core test machine). Grappler rewrites a graph for speed (constant folding,
fusions, pruning), not what it computes: the same run with and without it differs by float
rounding (after 2 steps of the tiny trunk with Adam, 6.5e-5 of a weight's range at most; Adam's
normalised steps make such differences grow over a run, so tests never compare a run with it
against a run without it). Users' runs keep it on; ``SPM_TEST_GRAPPLER=on`` in a process's
environment keeps it on there: the ``distribute_main.py --cpu-replicas 2`` run of
tests/test_training.py (MirroredStrategy's path as users run it); the ``graph_optimiser_on``
fixture of tests/conftest.py, in one test: tests/test_real_photos.py (the README's numbers).
"""

import importlib.machinery
import os
import sys


def _on_in_this_process() -> bool:
    return os.environ.get("SPM_TEST_GRAPPLER", "off") != "off"


def _configure(tf, on: bool = False):
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": not on})


def grappler_on(on: bool):
    """Switch it on (True) or back to this process's setting (False) for what runs next in this
    thread (tests/conftest.py's ``graph_optimiser_on`` fixture)."""
    import tensorflow as tf

    _configure(tf, on or _on_in_this_process())


class _AfterTensorFlowImport:
    """A meta-path finder that lets ``tensorflow`` import as usual, then configures it."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_configure(module):
            exec_module(module)
            _configure(module)

        spec.loader.exec_module = exec_then_configure
        return spec


def install():
    """Once per process (here at start-up; again from tests/conftest.py, a no-op then)."""
    if _on_in_this_process():
        return
    if "tensorflow" in sys.modules:
        _configure(sys.modules["tensorflow"])
    elif not any(type(f).__name__ == "_AfterTensorFlowImport" for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTensorFlowImport())


install()
