import importlib.util
import os
import sys

import pytest

# Tests import the packages from the repository root, as the tools do.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Grappler off in the test processes (tests/site/sitecustomize.py says why): in this one now, in
# every process it starts through PYTHONPATH.
from training_helpers import SITE  # noqa: E402
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), SITE) if p)
_spec = importlib.util.spec_from_file_location("spm_test_site", os.path.join(SITE, "sitecustomize.py"))
_site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_site)                                            # installs the hook

DATA_DIR = os.path.join(ROOT, "tests", "data", "ai_challenger_keypoint_example")
AIC_ANNOTATIONS = os.path.join(DATA_DIR, "keypoint_annotations_example.json")
AIC_PREDICTIONS = os.path.join(DATA_DIR, "keypoint_predictions_example.json")


@pytest.fixture
def graph_optimiser_on():
    """TensorFlow's Grappler on during the test, as users run (off in the other tests:
    tests/site/sitecustomize.py)."""
    _site.grappler_on(True)
    yield
    _site.grappler_on(False)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    """A small synthetic set made once (8 training, 4 validation images) for the evaluator."""
    from dataset.synthetic import ensure_synthetic_dataset
    from training_helpers import synthetic_config

    path = str(tmp_path_factory.mktemp("synth"))
    ensure_synthetic_dataset(synthetic_config("", path))
    return path


# The files whose tests take longest (minutes: several processes or trainers each), heaviest first.
# pytest-xdist hands whole files to its two workers in collection order (pytest.ini, --dist
# loadfile): starting these first keeps the two workers busy until the end instead of leaving one
# idle while the other runs a long file picked up last.
HEAVY_FILES = ("test_training.py", "test_distributed.py", "test_preemption.py", "test_real_photos.py",
               "test_benchmarks.py", "test_replicas.py", "test_tools.py", "test_export.py", "test_heatmaps.py",
               "test_skeletons.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return HEAVY_FILES.index(name) if name in HEAVY_FILES else len(HEAVY_FILES)

    items.sort(key=rank)        # stable: the tests of a file keep their order
