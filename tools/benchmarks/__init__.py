"""Measurement code behind ``python3 tools/benchmark.py NAME``: one module per subject.

Each module has ``run_benchmark(name, argv) -> dict``; it imports the library and is never
imported by it. ``spr``: ``oracle`` and ``decode``; ``model``; ``pipeline``; ``infer``.
"""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
