"""scripts/gpu-check's CPU path: every check runs and records its figures (they say nothing about a GPU;
on a CUDA machine the same script is the GPU check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_gpu_check_runs_every_check_on_the_cpu(tmp_path):
    proc = subprocess.run([str(REPO / "scripts" / "gpu-check"), "--device", "cpu", "--skip-tests", "--skip-bench",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("gpu-check-*.json")).read_text())
    assert report["device"] == "cpu" and report["tests"] == {"skipped": "--skip-tests"}
    for strategy in ("head", "until"):
        row = report["features"][strategy]
        assert row["finite"] and row["relative_error_ok"] and row["bn_folded"], row
        assert row["feature_rows"] > 0 and row["feature_images_per_s"] > 0
    assert report["compile"]["compiled"]["recompile_limit_warnings"] == []
    assert report["compile"]["compiled"]["compiled_stages"] and report["compile"]["compiled"]["unique_graphs"] >= 1
    assert report["compile"]["eager"]["compiled_stages"] == []
    assert report["amp"]["fp16"]["finite"] and report["amp"]["bf16"]["finite"]
    assert report["nccl"] == report["nccl"] | {"backend": "gloo", "world_size": 1, "finite": True}


def test_gpu_check_without_cuda_refuses_cuda_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([str(REPO / "scripts" / "gpu-check"), "--device", "cuda"], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --device cuda")
