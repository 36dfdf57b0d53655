"""The split is a function of each file's content: growing, renaming or copying files never moves
another file between train, val and test (on real JPEG photos from freezeflow.app.photosets)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from freezeflow.app.photosets import write_photoset
from freezeflow.core.data.folders import md5_file, scan_image_folder
from freezeflow.core.data.prepare import (Prepared, assign_class, content_position, prepare_dataset,
                                          split_of)
from freezeflow.core.params import DataParams, SplitParams

SPLIT = SplitParams(val=0.15, test=0.15, seed=0)


def split_by_file(prepared: Prepared) -> dict[str, str]:
    """posix path under the data folder -> the split prepare put it in."""
    manifest = json.loads((prepared.root / "manifest.json").read_text())
    return {manifest["files"][row]: name for name, rows in manifest["split"].items() for row in rows}


def rule_splits(root: Path) -> dict[str, set[str]]:
    """class -> the splits the rule alone (no tiny-class exception) gives its files."""
    classes, items = scan_image_folder(root)
    out: dict[str, set[str]] = {}
    for path, label in items:
        out.setdefault(classes[label], set()).add(split_of(content_position(md5_file(path), SPLIT.seed), SPLIT))
    return out


@pytest.fixture
def grown(tmp_path, photo_folder) -> tuple[Path, Path, list[str]]:
    """(data folder of 290 photos, folder of 88 more, the posix paths grow() gives those 88)."""
    data = tmp_path / "textures"
    shutil.copytree(photo_folder("textures", 40), data)
    extra = tmp_path / "extra"
    write_photoset("textures", extra, 12, seed=1)  # other photos: 30% more, every class grows
    return data, extra, [f"{path.parent.name}/new_{path.name}" for path in sorted(extra.rglob("*.jpg"))]


def grow(data: Path, extra: Path) -> None:
    for path in sorted(extra.rglob("*.jpg")):
        shutil.copy(path, data / path.parent.name / f"new_{path.name}")


def params(data: Path) -> DataParams:
    return DataParams(dir=str(data), image_size=32, split=SPLIT)


def test_growing_by_30_percent_moves_no_old_file(tmp_path, grown):
    data, extra, added = grown
    before = split_by_file(prepare_dataset(params(data), tmp_path / "prepared"))
    rule_before = rule_splits(data)
    grow(data, extra)
    assert len(added) / len(before) >= 0.3
    # no class is tiny, before or after: the rule alone fills every split, so no exception applies
    for splits in (rule_before, rule_splits(data)):
        assert all(s == {"train", "val", "test"} for s in splits.values()), splits
    after = split_by_file(prepare_dataset(params(data), tmp_path / "prepared"))
    assert set(after) == set(before) | set(added)
    for name in ("train", "val", "test"):
        old = [f for f, s in before.items() if s == name]
        assert old and all(after[f] == name for f in old), f"an old {name} file moved"
    for rel in added:  # and the new files follow the same rule
        assert after[rel] == split_of(content_position(md5_file(data / rel), SPLIT.seed), SPLIT)


def test_renaming_and_copying_keep_the_split(tmp_path, grown):
    data, _, _ = grown
    before = split_by_file(prepare_dataset(params(data), tmp_path / "prepared"))
    renamed = {}
    for name in ("train", "val", "test"):
        old = next(f for f, s in before.items() if s == name)
        new = f"{Path(old).parent}/renamed_{Path(old).name}"
        (data / old).rename(data / new)
        renamed[new] = name
    copies = {}
    for name in ("train", "test"):
        src = next(f for f, s in before.items() if s == name and (data / f).exists())
        copy = f"{Path(src).parent}/copy_of_{Path(src).name}"
        shutil.copy(data / src, data / copy)
        copies[copy] = src
    after = split_by_file(prepare_dataset(params(data), tmp_path / "prepared"))
    assert all(after[new] == name for new, name in renamed.items())
    assert all(after[copy] == after[src] == before[src] for copy, src in copies.items())
    untouched = set(before) & set(after)
    assert all(after[f] == before[f] for f in untouched)


def test_seed_and_fractions_change_the_split(tmp_path, grown):
    data, _, _ = grown
    base = split_by_file(prepare_dataset(params(data), tmp_path / "prepared"))
    other = split_by_file(prepare_dataset(replace(params(data), split=replace(SPLIT, seed=1)), tmp_path / "prepared"))
    assert base != other
    wider = split_by_file(prepare_dataset(replace(params(data), split=replace(SPLIT, test=0.3)), tmp_path / "prepared"))
    assert all(wider[f] == "test" for f, s in base.items() if s == "test")  # a larger fraction only adds


def test_a_tiny_class_still_gets_val_and_test_from_its_smallest_u():
    positions = {"a": 0.95, "b": 0.5, "c": 0.7, "d": 0.9}  # the rule puts all four in train
    where = assign_class(positions, SPLIT)
    assert where == {"a": "train", "b": "test", "c": "val", "d": "train"}
    positions = {"a": 0.01, "b": 0.05, "c": 0.1}  # all in test: val takes the largest u, train the next
    assert assign_class(positions, SPLIT) == {"a": "test", "b": "train", "c": "val"}
