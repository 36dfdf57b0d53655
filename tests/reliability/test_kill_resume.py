"""A real `freezeflow train` process killed with SIGKILL mid-epoch resumes to the same parameters."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from freezeflow.core.io import load_trusted
from tests.conftest import BIN, tiny_overrides, write_shapes_dataset


def train_cmd(data: Path, extra: list[str] = ()) -> list[str]:
    sets = tiny_overrides(data, **{"train.freeze.strategy": "none", "train.epochs": 4})
    return [str(BIN / "freezeflow"), "train", "--no-track", *[a for s in sets for a in ("-S", s)], *extra]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, project):
    data = write_shapes_dataset(tmp_path / "data", classes=3, per_class=60)
    straight = tmp_path / "straight"
    straight.mkdir()
    (straight / "params").symlink_to(project / "params")
    subprocess.run(train_cmd(data), cwd=straight, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(train_cmd(data), cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = project / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    assert proc.poll() is None, "training finished before it could be killed; make it slower"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    epoch_at_kill = load_trusted(checkpoint)["epoch"]
    assert 1 <= epoch_at_kill < 4

    resumed = subprocess.run(train_cmd(data, ["--resume"]), cwd=project, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a = load_trusted(straight / "models" / "model.pt")
    b = load_trusted(project / "models" / "model.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
