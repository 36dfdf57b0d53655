"""bench suite `serve` runs end to end with --tiny and writes a report of the right shape.

No timing assertions: times on a shared CI machine say nothing.
"""

from __future__ import annotations

import pytest

from bench import harness
from tests.bench.test_bench_suites import read_report


def test_serve_suite_times_every_runtime_and_batch_size_against_the_plain_loop(tmp_path):
    for name in ("mlflow", "onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    assert harness.main(["serve", "--tiny", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = read_report(tmp_path, "serve")
    rows = {c["name"]: c for c in report["contenders"]}
    assert list(rows) == [f"{kind}-b{batch}" for kind in ("plain-eager", "pyfunc-torch", "pyfunc-onnx")
                          for batch in (1, 64)]
    for row in rows.values():
        assert row["images"] == 16 and row["images_per_s"]["median"] > 0 and row["torch_threads"] == 1
    assert [c["batch"] for c in report["comparisons"]] == [1, 64]
    assert 0 <= report["onnx_parity_max_abs_diff"] < 1e-4
    assert [t["name"] for t in report["targets"]] == ["onnxruntime pyfunc vs plain eager loop, batch 64"]
