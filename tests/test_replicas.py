"""Training under tf.distribute in one process: 2 logical CPU replicas against one device (distinct
data per replica, float32 and float16 loss scaling), gradient clipping of the all-reduced gradient,
one replica's float16 overflow, the default evaluator under the strategy. Everything runs in one
fresh process (``training_helpers.py replicas``: logical devices must be set before TensorFlow
starts); the multi-process tests are in test_distributed.py."""

import os
import subprocess
import sys

import numpy as np
import pytest

from training_helpers import relative_moves, subprocess_env as _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(ROOT, "tests", "training_helpers.py")


@pytest.fixture(scope="module")
def replicas_run(tmp_path_factory, synth_dir):
    out = tmp_path_factory.mktemp("replicas")
    proc = subprocess.run([sys.executable, HELPERS, "replicas", str(out), synth_dir], env=_env(),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out / "replicas.npz")


@pytest.mark.parametrize("precision, loss_rtol, median_tol, max_tol",
                         [("float32", 1e-5, 1e-5, 1e-4), ("float16", 1e-2, 5e-2, 0.2)])
def test_two_logical_cpu_replicas_reading_distinct_data_match_one_device(replicas_run, precision, loss_rtol,
                                                                           median_tol, max_tol):
    """One SGD step on 2 replicas, 4 different pictures each, == the float32 step of 1 device on
    all 8, the replicas in float32 and under the float16 policy with loss scaling (at a scale
    where the step does not overflow); BatchNorm frozen, so batch statistics are out of the
    comparison. Per variable, the relative error of the move ``|d2 - d1| / |d1|`` is measured
    against the tolerance: here median 1e-7 and worst 9e-7 in float32, median 1e-2 and worst
    6e-2 in float16 (its gradients' precision). A replica reading the other's shard, one
    gradient counted twice or left out, a wrong normalisation (x2) or a scaled gradient left
    unscaled moves every variable by another gradient (50-100% or more)."""
    r = replicas_run
    np.testing.assert_allclose(float(r[f"{precision}_loss_two"]), float(r[f"{precision}_loss_one"]), rtol=loss_rtol)
    assert int(r[f"{precision}_skipped_two"]) == int(r[f"{precision}_skipped_one"]) == 0
    before, one, two = ([r[f"{precision}_{run}_{i}"] for i in range(int(r[f"{precision}_variables"]))]
                        for run in ("before", "one", "two"))
    errors = relative_moves(before, two, one)
    print(f"{precision}: relative error of the move, median {np.median(errors):.2e}, worst {max(errors):.2e}")
    assert np.median(errors) < median_tol and max(errors) < max_tol, (np.median(errors), max(errors))


def test_float16_overflow_on_one_replica_skips_the_update_everywhere(replicas_run):
    """Replica 1's gradient is infinite at step 2 (float16, 2 replicas, after the clipped step of
    the test below, BatchNorm training): no trainable variable
    changes on either replica, the loss scale halves, the optimizer counts only the next step,
    which trains."""
    r = replicas_run
    assert bool(r["overflow_unchanged"])
    assert float(r["overflow_scale_after"]) == float(r["overflow_scale_before"]) / 2
    assert list(r["overflow_skipped"]) == [2] and int(r["overflow_second_skipped"]) == 0
    assert int(r["overflow_iterations"]) == 1
    assert bool(r["overflow_moved"]) and bool(r["overflow_finite_after"])


def test_gradient_clipping_limits_the_all_reduced_gradient_on_two_replicas(replicas_run):
    """--grad-clip-norm 1e-2 on 2 replicas with distinct data, float16 with loss scale 256:
    SGD's first step (lr 1) moves the weights by lr x 1e-2 in global norm. A clip per replica
    gives up to twice that, a clip of the scaled gradient a 256th. (float32 runs the same clip
    without the scale: the XLA test of test_training.py compares it with the plain step.)"""
    r = replicas_run
    assert int(r["clip_float16_skipped"]) == 0
    assert float(r["clip_float16_moved"]) == pytest.approx(1e-2, rel=1e-3)


def test_default_evaluator_under_two_replicas_equals_one_device(replicas_run):
    r = replicas_run
    assert int(r["eval_alone_predicted_people"]) > 0      # the random head finds people
    assert int(r["eval_strategy_predicted_people"]) == int(r["eval_alone_predicted_people"])
    for k in ("score", "ap50"):          # two execution paths: equal to float noise of the joints
        assert float(r[f"eval_strategy_{k}"]) == pytest.approx(float(r[f"eval_alone_{k}"]), abs=1e-3), k
