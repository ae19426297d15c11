import os
import sys

import pytest

# Tests import the packages from the repository root, as the tools do.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DATA_DIR = os.path.join(ROOT, "tests", "data", "ai_challenger_keypoint_example")
AIC_ANNOTATIONS = os.path.join(DATA_DIR, "keypoint_annotations_example.json")
AIC_PREDICTIONS = os.path.join(DATA_DIR, "keypoint_predictions_example.json")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    """A small synthetic set made once (8 training, 4 validation images) for the evaluator."""
    from dataset.synthetic import ensure_synthetic_dataset
    from training_helpers import synthetic_config

    path = str(tmp_path_factory.mktemp("synth"))
    ensure_synthetic_dataset(synthetic_config("", path))
    return path
