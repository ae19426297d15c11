"""``tools/benchmark.py gpu --smoke``: the GPU check users run, in its CPU smoke size (its own file,
so that the test runners balance it against the other slow files)."""

import json

import pytest

from test_tools import _run


def test_gpu_benchmark_smoke_runs_every_configuration_and_reports_each(tmp_path):
    """``benchmark.py gpu --smoke``: the whole matrix users run on a GPU (three precisions, with
    and without XLA, real and in-memory input), the pipeline alone and inference (network and
    decoder, the exported SavedModel), at tiny sizes on this CPU; one row per configuration,
    none failed, the table and the JSON line."""
    r = _run("benchmark.py", "gpu", "--smoke", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["device"] == "CPU" and result["smoke"] is True
    rows = result["train"]
    assert {(row["precision"], row["xla"]) for row in rows} == {
        (p, x) for p in ("float32", "bfloat16", "float16") for x in (False, True)}
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
