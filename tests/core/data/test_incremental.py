"""Incremental prepare on real PNG files: a grown dataset decodes only its new files, a shrunk or
relabelled one decodes nothing, and a prepare killed with SIGKILL leaves nothing a later one uses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from freezeflow.core.data import pixels
from freezeflow.core.data.prepare import Prepared, prepare_dataset
from freezeflow.core.params import DataParams
from tests.conftest import REPO, write_shapes_dataset


def params(data: Path) -> DataParams:
    return DataParams(dir=str(data), image_size=32)


@pytest.fixture
def data(tmp_path) -> Path:
    return write_shapes_dataset(tmp_path / "shapes", classes=3, per_class=20)


@pytest.fixture
def decodes(monkeypatch) -> list[Path]:
    """Every file our decode function is called on, in this process."""
    calls: list[Path] = []
    real = pixels.decode_file

    def recording(path, data_params):
        calls.append(Path(path))
        return real(path, data_params)

    monkeypatch.setattr(pixels, "decode_file", recording)
    return calls


def grow(data: Path, tmp_path: Path, per_class: int) -> list[Path]:
    """Add per_class new PNGs (other pixels, new names) to every class; returns their paths."""
    extra = write_shapes_dataset(tmp_path / "extra", classes=3, per_class=per_class, seed=1)
    added = []
    for path in sorted(extra.rglob("*.png")):
        added.append(data / path.parent.name / f"new_{path.name}")
        shutil.copy(path, added[-1])
    return added


def manifest(prepared: Prepared) -> dict:
    return json.loads((prepared.root / "manifest.json").read_text())


def assert_same(one: Prepared, other: Prepared) -> None:
    """Two prepares of the same data: same arrays, split and manifest (but for the decode count and
    the pixel chunks the rows lie in: an incremental build's rows span more of them)."""
    assert np.array_equal(np.asarray(one.images), np.asarray(other.images))
    assert np.array_equal(one.labels, other.labels) and one.classes == other.classes
    assert all(np.array_equal(one.split[k], other.split[k]) for k in ("train", "val", "test"))
    drop = lambda m: {k: v for k, v in m.items() if k not in ("decoded", "chunks")}  # noqa: E731
    assert drop(manifest(one)) == drop(manifest(other))


def test_growing_by_30_percent_decodes_exactly_the_new_files(tmp_path, data, decodes):
    first = prepare_dataset(params(data), tmp_path / "prepared")
    assert first.decoded == 60 and len(decodes) == 60 and manifest(first)["decoded"] == 60
    decodes.clear()
    added = grow(data, tmp_path, per_class=6)
    lines = []
    grown = prepare_dataset(params(data), tmp_path / "prepared", progress=lambda d, t: lines.append((d, t)))
    assert grown.decoded == 18 and sorted(decodes) == sorted(added)
    assert lines[-1] == (18, 18)
    assert len(grown.labels) == 78 and grown.key != first.key
    assert_same(grown, prepare_dataset(params(data), tmp_path / "clean"))
    again = prepare_dataset(params(data), tmp_path / "prepared")
    assert again.decoded == 0 and again.root == grown.root


def test_removing_and_relabelling_decode_nothing(tmp_path, data, decodes):
    first = prepare_dataset(params(data), tmp_path / "prepared")
    split_of = {f: name for name, rows in first.split.items() for f in np.asarray(manifest(first)["files"])[rows]}
    decodes.clear()
    for rel in ("class_0/img_000.png", "class_1/img_005.png", "class_2/img_019.png"):
        (data / rel).unlink()
    moved = {"class_0/img_003.png": "class_2/from_0.png", "class_1/img_007.png": "class_0/from_1.png"}
    for src, dst in moved.items():
        (data / src).rename(data / dst)
    changed = prepare_dataset(params(data), tmp_path / "prepared")
    assert changed.decoded == 0 and decodes == []
    files = manifest(changed)["files"]
    assert len(files) == 57 and changed.key != first.key
    for src, dst in moved.items():
        row = files.index(dst)
        assert changed.classes[changed.labels[row]] == dst.split("/")[0]  # the new folder's label
        assert next(k for k, rows in changed.split.items() if row in rows) == split_of[src]  # same split
        assert np.array_equal(changed.images[row], first.images[manifest(first)["files"].index(src)])
    assert_same(changed, prepare_dataset(params(data), tmp_path / "clean"))


def test_identical_files_decode_once(tmp_path, data, decodes):
    shutil.copy(data / "class_0/img_001.png", data / "class_0/copy.png")
    prepared = prepare_dataset(params(data), tmp_path / "prepared")
    assert prepared.decoded == 60 and len(prepared.labels) == 61


KILLED = """
import sys, time
from freezeflow.core.data import pixels
from freezeflow.core.data.prepare import prepare_dataset
from freezeflow.core.params import DataParams

pixels.CHUNK_BYTES = 8 * 3 * 32 * 32  # a chunk of 8 rows: several commits before the kill
real = pixels.decode_file
def slow(path, params):
    time.sleep(0.05)  # slow enough that the kill lands mid-prepare
    return real(path, params)
pixels.decode_file = slow
prepare_dataset(DataParams(dir=sys.argv[1], image_size=32), sys.argv[2],
                progress=lambda done, total: print(f"decoded {done}/{total}", flush=True))
print("finished", flush=True)
"""


def test_a_prepare_killed_mid_decode_is_completed_by_the_next(tmp_path, data):
    out = tmp_path / "prepared"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED), str(data), str(out)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("decoded 20/"):
                break
        else:
            pytest.fail(f"no progress line; exit {proc.wait()}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not list(out.glob("shapes/*/manifest.json")), "killed mid-decode, yet a view was published"
    store = pixels.store_dir(out, params(data))
    assert len(pixels.read_index(store).rows) >= 16  # two chunks of 8 were committed before row 20

    resumed = prepare_dataset(params(data), out)
    assert 0 < resumed.decoded <= 60 - 16  # the committed chunks are reused, nothing is lost
    assert_same(resumed, prepare_dataset(params(data), tmp_path / "clean"))
    leftovers = [p.name for p in store.iterdir() if p.name.endswith(".tmp")
                 or (p.suffix == ".npy" and not p.with_suffix(".json").exists())]
    assert leftovers == []


def test_a_grown_view_writes_its_index_not_a_copy_of_the_pixels(tmp_path, data):
    first = prepare_dataset(params(data), tmp_path / "prepared")
    grow(data, tmp_path, per_class=6)
    grown = prepare_dataset(params(data), tmp_path / "prepared")
    view_bytes = sum(p.stat().st_size for p in grown.root.iterdir())
    assert view_bytes < grown.images.nbytes / 20, "the view must index the pixel store, not copy its rows"
    assert set(manifest(first)["chunks"]) < set(manifest(grown)["chunks"])  # the old rows stay where they are
    assert np.array_equal(np.asarray(grown.images), np.asarray(prepare_dataset(params(data), tmp_path / "c").images))


def test_a_view_whose_pixel_chunk_is_gone_is_rebuilt(tmp_path, data, decodes):
    """A chunk dropped as corrupt (or deleted by hand) makes the views that read it stale: the next
    prepare decodes that chunk's contents again and publishes a whole view."""
    pixels.CHUNK_BYTES, saved = 20 * 3 * 32 * 32, pixels.CHUNK_BYTES  # chunks of 20 rows
    try:
        first = prepare_dataset(params(data), tmp_path / "prepared")
    finally:
        pixels.CHUNK_BYTES = saved
    store = pixels.store_dir(tmp_path / "prepared", params(data))
    gone = manifest(first)["chunks"][1]
    (store / f"{gone}.json").unlink()
    (store / f"{gone}.npy").unlink()
    decodes.clear()
    rebuilt = prepare_dataset(params(data), tmp_path / "prepared")
    assert rebuilt.decoded == 20 and len(decodes) == 20 and rebuilt.root == first.root
    assert gone not in manifest(rebuilt)["chunks"]
    assert_same(rebuilt, prepare_dataset(params(data), tmp_path / "clean"))
    assert not list(rebuilt.root.parent.glob(".tmp-*")), "the stale view is removed, not left aside"
