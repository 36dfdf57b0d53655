"""A full disk while training: one clear line, exit 2, earlier outputs and checkpoints intact."""

from __future__ import annotations

import resource
import signal
import subprocess

from tests.conftest import BIN, tiny_overrides

LIMIT = 2 * 2**20  # bytes any one file may grow to: resnet18 checkpoints are ~45 MB


def small_disk():
    """Files stop growing at LIMIT: writes fail with EFBIG, as on a full disk (ENOSPC)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def test_full_disk_is_a_clear_error_and_loses_nothing(project, shapes_dir):
    sets = [a for s in tiny_overrides(shapes_dir, **{"train.epochs": 1}) for a in ("-S", s)]
    cmd = [str(BIN / "freezeflow"), "train", "--no-track", *sets]
    subprocess.run(cmd, cwd=project, check=True, capture_output=True, timeout=300)
    model = (project / "models" / "model.pt").read_bytes()
    checkpoint = (project / "checkpoints" / "last.pt").read_bytes()
    metrics = (project / "reports" / "metrics.json").read_text()

    proc = subprocess.run([*cmd, "-S", "train.lr=0.02"], cwd=project, capture_output=True, text=True,
                          timeout=300, preexec_fn=small_disk)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write") and "unchanged" in lines[0], proc.stderr
    assert (project / "models" / "model.pt").read_bytes() == model
    assert (project / "checkpoints" / "last.pt").read_bytes() == checkpoint
    assert (project / "reports" / "metrics.json").read_text() == metrics
    leftovers = [p.name for p in (project / "checkpoints").iterdir() if p.name != "last.pt" and p.is_file()]
    assert leftovers == [], "a partial temp file was left behind"
