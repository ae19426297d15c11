"""``tools/benchmark.py gpu --smoke``: the GPU check users run, in its CPU smoke size (its own file,
so that the test runners balance it against the other slow files)."""

import json

import pytest

from training_helpers import run_tool


def test_gpu_benchmark_smoke_runs_float16_with_xla_and_reports_each_part(tmp_path):
    """``benchmark.py gpu --smoke --precisions float16 --xla on``: the configuration users run on
    a GPU for speed (float16 with dynamic loss scaling, the step compiled with XLA), real and
    in-memory input, the pipeline alone and inference (network and decoder, the exported
    SavedModel), at tiny sizes on this CPU; the row not failed, the table and the JSON line.
    (A row costs about 20 s of XLA compilation here, so the other rows are left out: without
    XLA, float16 trains on two replicas in test_replicas.py and in test_training.py's non-finite
    test; float32 with and without XLA is test_training.py's XLA test; bfloat16, a precision of
    recent GPUs, is float32's step under another dtype policy (the model under it:
    test_hrnet.py); the default matrix, its order and a failed row: below.) In this process, as
    the other tools' tests: the command line's ``main(argv)`` without a second TensorFlow start."""
    r = run_tool("benchmark.py", "gpu", "--smoke", "--precisions", "float16", "--xla", "on")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    import tensorflow as tf

    # the device it ran on: this process's (the CPU here; a GPU's name on a GPU host)
    assert (result["device"] == "CPU") == (not tf.config.list_physical_devices("GPU")) and result["smoke"] is True
    rows = result["train"]
    assert [(row["precision"], row["xla"]) for row in rows] == [("float16", True)]
    for row in rows:
        assert "failed" not in row, row
        assert row["pipeline_images_per_s"] > 0 and row["in_memory_images_per_s"] > 0
        assert row["input_share"] == pytest.approx(1 - row["pipeline_images_per_s"] / row["in_memory_images_per_s"], abs=1e-3)
    assert result["pipeline_images_per_s"] > 0
    inference = result["inference"]
    for key in ("network_decoder_batch1_images_per_s", "network_decoder_batch2_images_per_s",
                "saved_model_batch1_images_per_s", "saved_model_batch2_images_per_s"):
        assert inference[key] > 0, key
    assert inference["conv_gmacs_per_image"] > 0
    assert "| 2 | float16 | True |" in r.stdout and "GFLOP per trained image" in r.stdout


def test_gpu_benchmark_runs_the_whole_matrix_and_reports_a_failed_configuration(monkeypatch, capsys):
    """The default matrix (every per-GPU batch x three precisions x XLA off and on), in order; a
    configuration that fails (here: out of GPU memory when the trainer is built, after it set
    its precision) is one row naming the error, the float32 policy is restored, and the others
    still run."""
    import keras
    import tensorflow as tf

    from tools.benchmarks import gpu

    real_row, real_trainer = gpu._train_row, gpu.Trainer
    asked = []

    def out_of_memory(cfg, **kwargs):
        keras.mixed_precision.set_global_policy("mixed_float16")
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape [32,64,256,256]")

    def row(cfg, batch, precision, xla, steps, per_call):
        asked.append((batch, precision, xla))
        if (batch, precision, xla) == (32, "float16", True):
            gpu.Trainer = out_of_memory
            try:
                return real_row(cfg, batch, precision, xla, steps, per_call)
            finally:
                gpu.Trainer = real_trainer
        return {"batch": batch, "precision": precision, "xla": xla, "pipeline_images_per_s": 2.0,
                "in_memory_images_per_s": 4.0, "input_share": 0.5, "peak_gpu_mb": None}

    monkeypatch.setattr(gpu, "_train_row", row)
    monkeypatch.setattr(gpu, "InputPipeline", lambda cfg, split: None)
    monkeypatch.setattr(gpu, "_pipeline_rate", lambda cfg, batches: 1.0)
    monkeypatch.setattr(gpu, "_inference", lambda cfg, batches, repeats: {"conv_gmacs_per_image": 43.0})
    result = gpu.run_benchmark("gpu", [])
    assert asked == [(b, p, x) for b in (16, 32) for p in ("float32", "bfloat16", "float16") for x in (False, True)]
    failed = [r for r in result["train"] if "failed" in r]
    assert len(failed) == 1 and (failed[0]["batch"], failed[0]["precision"], failed[0]["xla"]) == (32, "float16", True)
    assert failed[0]["failed"] == "ResourceExhaustedError: OOM when allocating tensor with shape [32,64,256,256]"
    assert keras.mixed_precision.global_policy().name == "float32"
    out = capsys.readouterr().out
    assert "| 32 | float16 | True | failed: ResourceExhaustedError" in out
    assert "| 32 | float16 | False | 2.0 | 4.0 | 50% | None |" in out
