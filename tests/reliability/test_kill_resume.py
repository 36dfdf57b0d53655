"""A real `freezeflow train` process killed with SIGKILL mid-epoch resumes to the same parameters.

The kill is timed by the child's own progress line for epoch 2 (no sleep): it lands inside epoch 3.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from freezeflow.core.io import load_trusted
from tests.conftest import BIN, tiny_overrides, write_shapes_dataset


def train_cmd(data: Path, extra: list[str] = ()) -> list[str]:
    sets = tiny_overrides(data, **{"train.freeze.strategy": "none", "train.epochs": 4})
    return [str(BIN / "freezeflow"), "train", "--no-track", *[a for s in sets for a in ("-S", s)], *extra]


def pump_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)  # end of output: the child exited


def wait_for_line(proc: subprocess.Popen, pattern: re.Pattern, timeout: float) -> list[str]:
    """Read the child's output line by line (in a thread: readline blocks) until a line matches.
    Returns the lines read; kills the child and fails with them if it exits or falls silent first."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=pump_lines, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    while not seen or not pattern.search(seen[-1]):
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            line = None
        if line is None:
            proc.kill()
            pytest.fail(f"no line matching {pattern.pattern!r} (exit code {proc.poll()}):\n" + "".join(seen))
        seen.append(line)
    return seen


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, project):
    data = write_shapes_dataset(tmp_path / "data", classes=3, per_class=60)
    straight = tmp_path / "straight"
    straight.mkdir()
    (straight / "params").symlink_to(project / "params")
    subprocess.run(train_cmd(data), cwd=straight, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(train_cmd(data), cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = wait_for_line(proc, re.compile(r"^epoch\s+2/4\b"), timeout=300)  # epoch 2 is checkpointed
    assert proc.poll() is None, "training finished before it could be killed; make it slower:\n" + "".join(seen)
    os.kill(proc.pid, signal.SIGKILL)  # now inside epoch 3
    proc.wait()
    checkpoint = project / "checkpoints" / "last.pt"
    assert load_trusted(checkpoint)["epoch"] == 2

    resumed = subprocess.run(train_cmd(data, ["--resume"]), cwd=project, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a = load_trusted(straight / "models" / "model.pt")
    b = load_trusted(project / "models" / "model.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
