"""Device selection for distribute_main.py --gpus (no GPU needed: it only sets CUDA's env)."""

import subprocess
import sys

import pytest

from conftest import ROOT
from utils.distribute import parse_gpu_ids, select_gpus, tf_config_task


def test_gpus_2_3_selects_exactly_those_devices():
    env = {}
    assert select_gpus("2,3", env) == [2, 3]
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"   # ids as nvidia-smi numbers them


def test_gpus_are_relative_to_an_existing_visible_list():
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6"}
    assert select_gpus("1,2", env) == [5, 6]
    assert env["CUDA_VISIBLE_DEVICES"] == "5,6"
    with pytest.raises(ValueError, match="exposes only 3 GPUs"):
        select_gpus("3", {"CUDA_VISIBLE_DEVICES": "4,5,6"})


@pytest.mark.parametrize("spec", ["", "a", "1,,2", "-1", "1,1", "0.5"])
def test_bad_gpu_lists_are_refused(spec):
    with pytest.raises(ValueError, match="--gpus"):
        parse_gpu_ids(spec)


def test_tf_config_parsing():
    assert tf_config_task({}) is None
    conf = tf_config_task({"TF_CONFIG": '{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 0}}'})
    assert conf["task"]["index"] == 0
    with pytest.raises(ValueError, match="TF_CONFIG must be JSON"):
        tf_config_task({"TF_CONFIG": '{"cluster": {}}'})


def test_distribute_main_sets_devices_before_tensorflow_starts():
    """In a fresh process, --gpus must reach CUDA_VISIBLE_DEVICES before TensorFlow is imported."""
    code = (
        "import sys, os; sys.argv = ['distribute_main.py', '--gpus', '2,3'];"
        "sys.path.insert(0, %r);"
        "import distribute_main;"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow imported before device selection';"
        "from utils.distribute import select_gpus; select_gpus('2,3');"
        "assert 'tensorflow' not in sys.modules;"
        "print(os.environ['CUDA_VISIBLE_DEVICES'])" % ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2,3"
