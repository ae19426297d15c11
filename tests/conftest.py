import os
import sys

# Tests import the packages from the repository root, as the tools do.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DATA_DIR = os.path.join(ROOT, "tests", "data", "ai_challenger_keypoint_example")
AIC_ANNOTATIONS = os.path.join(DATA_DIR, "keypoint_annotations_example.json")
AIC_PREDICTIONS = os.path.join(DATA_DIR, "keypoint_predictions_example.json")
