"""The per-image feature store on growing, changing and damaged data: a retrain computes rows only for
new contents, a file changed in place is never served its old features, a corrupt chunk is detected
by its checksum and recomputed, a killed extension is completed, and two trainings at once share
the work. Every run is compared with a clean project's run on the same data."""

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
from PIL import Image

from freezeflow.core import chunks
from freezeflow.core.layout import Layout
from freezeflow.core.params import load_params
from freezeflow.core.train import feature_store
from freezeflow.core.train.run import run_training
from tests.conftest import REPO, tiny_overrides, write_shapes_dataset
from tests.core.train.test_features import write_weights

ROWS_KEPT = ("val_accuracy", "val_loss", "test_accuracy")


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return write_weights(tmp_path / "w.pt", seed=0)


def overrides(data: Path, weights: Path, **extra) -> list[str]:
    return tiny_overrides(data, **{"train.epochs": 1, "train.freeze.strategy": "until", "train.freeze.until": 3,
                                   "train.weights": str(weights), **extra})


def train(root: Path, data: Path, weights: Path, **extra) -> dict:
    if not (root / "params").exists():
        shutil.copytree(REPO / "params", root / "params", ignore=shutil.ignore_patterns("best.yaml"))
    return run_training(load_params(root / "params", overrides(data, weights, **extra)), root)


def same_result(a: dict, b: dict) -> None:
    for key in ROWS_KEPT:
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def grow(data: Path, per_class: int, seed: int) -> list[Path]:
    """Add per_class new images to each class (new contents): the paths written."""
    extra = write_shapes_dataset(data.parent / f"extra-{seed}", per_class=per_class, seed=seed)
    added = []
    for path in sorted(extra.rglob("*.png")):
        target = data / path.parent.name / f"new{seed}_{path.name}"
        shutil.copy(path, target)
        added.append(target)
    return added


def test_a_retrain_on_grown_data_computes_rows_only_for_the_new_images(tmp_path, shapes_dir, weights):
    first = train(tmp_path / "p", shapes_dir, weights)
    assert first["images_decoded"] == 36 and first["feature_rows_computed"] == 36
    added = grow(shapes_dir, per_class=4, seed=7)  # +33%
    second = train(tmp_path / "p", shapes_dir, weights)
    assert second["images_decoded"] == len(added) == 12
    assert second["feature_rows_computed"] == 12  # train, val and test rows of the new files only
    same_result(second, train(tmp_path / "clean", shapes_dir, weights))  # as if trained from scratch


def test_a_file_changed_in_place_is_decoded_again_and_never_gets_its_old_features(tmp_path, shapes_dir, weights):
    train(tmp_path / "p", shapes_dir, weights)
    victim = sorted(shapes_dir.rglob("*.png"))[5]
    pixels = np.asarray(Image.open(victim)).copy()
    pixels[::2] = 255 - pixels[::2]  # same name, new bytes
    Image.fromarray(pixels).save(victim)
    again = train(tmp_path / "p", shapes_dir, weights)
    assert again["images_decoded"] == 1 and again["feature_rows_computed"] == 1
    same_result(again, train(tmp_path / "clean", shapes_dir, weights))


def test_a_corrupt_chunk_is_detected_by_its_checksum_and_recomputed(tmp_path, shapes_dir, weights):
    first = train(tmp_path / "p", shapes_dir, weights)
    (store,) = [p for p in Layout(tmp_path / "p").features.iterdir() if p.is_dir()]
    chunk = max(chunks.read_chunks(store, feature_store.PREFIX), key=lambda c: len(c.keys))  # the train rows
    path = store / f"{chunk.name}.npy"
    data = bytearray(path.read_bytes())
    data[-200:-100] = bytes(100)  # rows damaged on disk, header intact: it still loads
    path.write_bytes(bytes(data))
    again = train(tmp_path / "p", shapes_dir, weights)
    assert again["feature_rows_computed"] == len(chunk.keys), "the damaged rows were trained on"
    assert not path.exists()
    same_result(again, first)


def test_a_shrinking_dataset_reuses_everything(tmp_path, shapes_dir, weights):
    train(tmp_path / "p", shapes_dir, weights)
    for path in sorted(shapes_dir.rglob("*.png"))[::6]:
        path.unlink()  # 6 of 36 files gone, every class keeps 10
    smaller = train(tmp_path / "p", shapes_dir, weights)
    assert smaller["images_decoded"] == 0 and smaller["feature_rows_computed"] == 0
    same_result(smaller, train(tmp_path / "clean", shapes_dir, weights))


KILLED = """
import os, signal, sys
from pathlib import Path
from freezeflow.core.params import load_params
from freezeflow.core.train import features
from freezeflow.core.train.callbacks import Callback
from freezeflow.core.train.run import run_training

features.EXTRACT_BATCH, features.CHUNK_BYTES = 4, 1  # one committed chunk per 4 rows


class KillMidway(Callback):
    def on_feature_progress(self, label, done, total):
        if done >= 12:  # three chunks committed, the rest not computed
            os.kill(os.getpid(), signal.SIGKILL)


root = Path(sys.argv[1])
run_training(load_params(root / "params", sys.argv[2:]), root, callbacks=[KillMidway()])
"""


def test_a_training_killed_mid_extension_is_completed_by_the_next(tmp_path, shapes_dir, weights):
    root = tmp_path / "p"
    shutil.copytree(REPO / "params", root / "params", ignore=shutil.ignore_patterns("best.yaml"))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED), str(root),
                           *overrides(shapes_dir, weights)], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (store,) = [p for p in Layout(root).features.iterdir() if p.is_dir()]
    assert sum(len(c.keys) for c in chunks.read_chunks(store, feature_store.PREFIX)) == 12
    resumed = train(root, shapes_dir, weights)
    assert resumed["feature_rows_computed"] == 36 - 12  # the committed rows are kept, nothing twice
    same_result(resumed, train(tmp_path / "clean", shapes_dir, weights))
    leftovers = [p.name for p in store.iterdir() if p.name.endswith(".tmp")
                 or (p.suffix == ".npy" and not p.with_suffix(".json").exists())]
    assert leftovers == []


def test_two_trainings_at_once_on_one_cache_compute_each_row_once(tmp_path, shapes_dir, weights):
    roots = [tmp_path / "a", tmp_path / "b"]
    (tmp_path / "shared-cache").mkdir()
    for root in roots:
        shutil.copytree(REPO / "params", root / "params", ignore=shutil.ignore_patterns("best.yaml"))
        (root / "cache").symlink_to(tmp_path / "shared-cache")  # one cache/features for both
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "freezeflow.core.train", *sum((["-S", o] for o in
                               overrides(shapes_dir, weights)), [])], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for root in roots]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    metrics = [json.loads((root / "reports" / "metrics.json").read_text()) for root in roots]
    # whoever holds a store's lock computes what is missing: the two may share the work, never repeat it
    assert sum(m["feature_rows_computed"] for m in metrics) == 36
    same_result(*metrics)
    (store,) = [p for p in (tmp_path / "shared-cache" / "features").iterdir() if p.is_dir()]
    assert sum(len(c.keys) for c in chunks.read_chunks(store, feature_store.PREFIX)) == 36


def test_the_cache_stays_under_max_gb_and_prune_keeps_what_is_in_use(tmp_path, shapes_dir, weights):
    root = tmp_path / "p"
    train(root, shapes_dir, weights)
    other = write_weights(tmp_path / "w2.pt", seed=1)
    train(root, shapes_dir, other)
    folder = Layout(root).features
    entries = feature_store.list_entries(folder)
    assert [e.kind for e in entries] == ["features", "features"] and all(e.rows == 36 for e in entries)
    newest = entries[-1]
    budget = newest.size_bytes + 1  # room for one store: the older goes when the next one is written
    third = write_weights(tmp_path / "w3.pt", seed=2)
    train(root, shapes_dir, third, **{"train.cache.max_gb": budget / 2**30})
    names = [e.path.name for e in feature_store.list_entries(folder)]
    assert len(names) == 1 and newest.path.name not in names  # only the store of the run in progress
    with chunks.store_lock(folder / names[0]):  # a training holds it: prune leaves it
        assert feature_store.prune_entries(folder, max_bytes=0) == []
    assert [e.path.name for e in feature_store.prune_entries(folder, max_bytes=0)] == names
