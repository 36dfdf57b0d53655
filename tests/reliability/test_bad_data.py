"""Bad data through the CLI: one line per bad file, quarantine (never deletion), the rest used; a held DVC lock."""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
from PIL import Image

from tests.conftest import BIN, write_shapes_dataset


def png_bytes(size=(32, 32)) -> bytes:
    """A noisy PNG: it does not compress, so cutting it really truncates the pixel data."""
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_every_bad_kind_is_quarantined_with_a_line_naming_it(tmp_path, project):
    src = write_shapes_dataset(tmp_path / "src", classes=3, per_class=5)
    bad = {
        "class_0/zero.png": b"",
        "class_0/truncated.png": png_bytes((64, 64))[:6000],
        "class_1/text.jpg": b"hello, not a jpeg",
        "class_1/tiny.png": png_bytes((4, 4)),
    }
    for rel, data in bad.items():
        (src / rel).write_bytes(data)
    bomb = Image.new("1", (9000, 9000))  # 81 Mpx but tiny on disk
    bomb.save(src / "class_2" / "bomb.png")
    proc = subprocess.run([str(BIN / "freezeflow"), "ingest", str(src), "--name", "mixed", "--no-track",
                           "-S", "data.max_pixels=50000000"], cwd=project, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("rejected: ")]
    assert len(lines) == 5
    for rel in [*bad, "class_2/bomb.png"]:
        assert any(rel in line for line in lines), rel
        assert (project / "quarantine" / "mixed" / rel).exists() and (src / rel).exists()
    report = json.loads((project / "reports" / "ingest.json").read_text())
    assert report["rejected_by_reason"] == {"corrupt": 1, "empty": 1, "not_an_image": 1, "too_large": 1,
                                            "too_small": 1}
    assert report["classes"] == {"class_0": 5, "class_1": 5, "class_2": 5}
    assert len(list((project / "data" / "mixed").rglob("*.png"))) == 15


def test_a_held_dvc_lock_says_what_to_do(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=repo, check=True)
    (repo / ".dvc" / "tmp").mkdir(exist_ok=True)
    holder = subprocess.Popen([str(BIN / "python"), "-c",
                               "import sys, time, zc.lockfile; l = zc.lockfile.LockFile(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", str(repo / ".dvc" / "tmp" / "lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run([str(BIN / "freezeflow"), "data", "digits"], cwd=repo, capture_output=True,
                              text=True, timeout=300)
    finally:
        holder.kill()
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and ".dvc/tmp/lock" in lines[0] and "delete that file" in lines[0], proc.stderr


def test_duplicates_and_a_label_conflict_each_get_one_line(tmp_path, project):
    src = write_shapes_dataset(tmp_path / "src", classes=3, per_class=5)
    (src / "class_0" / "again.png").write_bytes((src / "class_0" / "img_000.png").read_bytes())
    (src / "class_2" / "stray.png").write_bytes((src / "class_1" / "img_001.png").read_bytes())
    proc = subprocess.run([str(BIN / "freezeflow"), "ingest", str(src), "--name", "dups", "--no-track"],
                          cwd=project, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    rejected = [line for line in lines if line.startswith("rejected: ")]
    assert len(rejected) == 1 and "class_2/stray.png: label_conflict" in rejected[0], proc.stderr
    assert sum(line.startswith("warning: duplicate: ") for line in lines) == 1, proc.stderr
    conflict = [line for line in lines if line.startswith("warning: label conflict: ")]
    assert len(conflict) == 1 and "kept class_1/img_001.png" in conflict[0], proc.stderr
    report = json.loads((project / "reports" / "ingest.json").read_text())
    assert report["rejected_by_reason"] == {"label_conflict": 1}
    assert len(report["duplicates"]) == 2 and len(report["label_conflicts"]) == 1
    assert report["classes"] == {"class_0": 6, "class_1": 5, "class_2": 5}
    assert (project / "quarantine" / "dups" / "class_2" / "stray.png").is_file()
    assert not (project / "data" / "dups" / "class_2" / "stray.png").exists()
