"""Data-parallel training: real torchrun processes with gloo on the CPU, compared with one process.

Same global batch and seed: with `head` (no BatchNorm in the trainable part) two ranks compute the
single-process update up to float summation order; with BatchNorm in the trainable stages each
rank normalizes with its own half-batch, so only "trains and agrees with itself" is asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from freezeflow.core import chunks
from freezeflow.core.io import load_trusted
from freezeflow.core.train import feature_store
from freezeflow.core.train.distributed import World, shard_order, split_range
from tests.conftest import BIN, tiny_overrides, write_shapes_dataset

pytestmark = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def sets(data: Path, **extra) -> list[str]:
    return [a for s in tiny_overrides(data, **{"train.epochs": 3, **extra}) for a in ("-S", s)]


def run_in(cwd: Path, cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc


def history(root: Path) -> list[dict]:
    return json.loads((root / "reports" / "history.json").read_text())


def link_params(root: Path, project: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params").symlink_to(project / "params")
    return root


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_shapes_dataset(tmp_path / "data", classes=3, per_class=16)


def test_global_batches_are_split_into_rank_slices():
    order = np.arange(24)
    parts = [shard_order(order, 8, World(rank, 2)) for rank in range(2)]
    assert parts[0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    assert sorted(np.concatenate(parts).tolist()) == order.tolist()
    assert [split_range(5, World(r, 2)) for r in range(2)] in ([(0, 2), (2, 5)], [(0, 3), (3, 5)])


def test_two_gloo_ranks_match_one_process_and_share_one_feature_cache(tmp_path, project, data):
    one = link_params(tmp_path / "one", project)
    two = link_params(tmp_path / "two", project)
    run_in(one, [sys.executable, "-m", "freezeflow.core.train", *sets(data)])
    out = run_in(two, [*TORCHRUN, "-m", "freezeflow.core.train", *sets(data)])
    assert json.loads(out.stdout.strip().splitlines()[-1])["processes"] == 2  # printed once, by rank 0
    h1, h2 = history(one), history(two)
    assert [r["train_loss"] for r in h2] == pytest.approx([r["train_loss"] for r in h1], rel=1e-4)
    assert [r["val_accuracy"] for r in h2] == [r["val_accuracy"] for r in h1]
    a, b = load_trusted(one / "models" / "model.pt"), load_trusted(two / "models" / "model.pt")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    # the frozen prefix was computed once, by parts, into the same stores and rows a single process writes
    rows_one, rows_two = stored_rows(one), stored_rows(two)
    assert rows_one.keys() == rows_two.keys() and rows_one
    for key, row in rows_one.items():  # other batch compositions: equal to fp16 rounding
        np.testing.assert_allclose(rows_two[key].astype(np.float32), row.astype(np.float32), rtol=2e-3, atol=1e-3,
                                   err_msg=key)
    assert json.loads((two / "reports" / "metrics.json").read_text())["feature_rows_computed"] < len(rows_two)


def stored_rows(root: Path) -> dict[str, np.ndarray]:
    """(store, row key) -> the row, over every feature store of a project."""
    rows = {}
    for store in (root / "cache" / "features").iterdir():
        for chunk in chunks.read_chunks(store, feature_store.PREFIX):
            data = np.load(store / f"{chunk.name}.npy")
            rows |= {f"{store.name}/{key}": data[i] for i, key in enumerate(chunk.keys)}
    return rows


def test_cli_nproc_logs_one_mlflow_run_and_trains_batchnorm_stages(tmp_path, project, data):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_in(project, [str(BIN / "freezeflow"), "train", "--nproc", "2",
                     *sets(data, **{"train.freeze.strategy": "until", "train.freeze.until": 3})],
           env={"MLFLOW_TRACKING_URI": uri})
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["epochs"] == 3
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 1 logged nothing
    assert runs[0].data.metrics["val_accuracy"] == pytest.approx(metrics["val_accuracy"])


def test_bad_global_batch_is_one_line_before_any_process_starts(project, data):
    proc = subprocess.run([str(BIN / "freezeflow"), "train", "--nproc", "2", "--no-track",
                           *sets(data, **{"train.batch_size": 7})], cwd=project, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: params/train.yaml: batch_size: 7 is the global batch and "
                                                    "must split evenly over 2 processes; allowed: a multiple of 2")
    assert not (project / "checkpoints").exists()


def test_killed_ddp_run_resumes_to_the_uninterrupted_result(tmp_path, project):
    data = write_shapes_dataset(tmp_path / "big", classes=3, per_class=60)
    args = sets(data, **{"train.freeze.strategy": "none", "train.epochs": 3})
    straight = link_params(tmp_path / "straight", project)
    run_in(straight, [*TORCHRUN, "-m", "freezeflow.core.train", *args])

    proc = subprocess.Popen([*TORCHRUN, "-m", "freezeflow.core.train", *args], cwd=project, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoint = project / "checkpoints" / "last.pt"
    deadline = time.time() + 400
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; make it slower"
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
    proc.wait()
    assert 1 <= load_trusted(checkpoint)["epoch"] < 3

    run_in(project, [*TORCHRUN, "-m", "freezeflow.core.train", *args, "--resume"])
    a, b = load_trusted(straight / "models" / "model.pt"), load_trusted(project / "models" / "model.pt")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_a_fixed_cuda_device_under_torchrun_is_refused(monkeypatch):
    """device: cuda:1 under torchrun would put every rank on GPU 1: refused before any group is joined."""
    from freezeflow.core.errors import UserError
    from freezeflow.core.train.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="device: 'cuda:1' would put every torchrun rank on that one GPU"):
        init_distributed("cuda:1")
