"""freezeflow.core.data.folders: digits PNGs, ImageFolder scanning, ingest and hashing, on real files."""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from freezeflow.app.sample_data import encode_png, write_digits
from freezeflow.core.data.folders import hash_folder, ingest_folder, scan_image_folder
from freezeflow.core.errors import DataError

# hash_folder of write_digits' output. Computed once; a change means the PNG bytes drifted, and
# with them the DVC hash of the default dataset.
DIGITS_HASH = "751a11a06b17d689a169e6bb0b6d3b66"

LIMITS = {"max_pixels": 1_000_000, "min_side": 16, "imbalance_warn": 10.0}


def good_png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = {"cat/empty.png": "empty", "cat/truncated.jpg": "corrupt", "dog/truncated.png": "corrupt",
             "dog/text.jpg": "not_an_image", "fish/bomb.png": "too_large", "fish/tiny.png": "too_small"}


def make_bad_files(root: Path) -> None:
    """One file of each kind in BAD_FILES, spread over the classes."""
    (root / "cat/empty.png").write_bytes(b"")
    jpg = root / "cat/truncated.jpg"
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(jpg, quality=90)
    cut_in_half(jpg)
    cut_in_half(good_png(root / "dog/truncated.png", 99))
    (root / "dog/text.jpg").write_text("not a jpeg\n")
    Image.new("1", (2000, 2000)).save(root / "fish/bomb.png")  # 4 Mpixel, ~1 KB on disk
    Image.new("RGB", (4, 4)).save(root / "fish/tiny.png")


@pytest.fixture
def source(tmp_path) -> Path:
    """3 classes of good PNGs (one nested), every bad kind, and hidden litter."""
    root = tmp_path / "src"
    for i, rel in enumerate(["cat/a.png", "cat/b.png", "cat/sub/c.png", "dog/a.png", "dog/b.png",
                             "fish/a.png", "fish/b.png", "fish/c.png", "fish/d.png"]):
        good_png(root / rel, i)
    make_bad_files(root)
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "cat/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "cat/._a.png").write_bytes(b"\0\5\26\7 AppleDouble")
    good_png(root / ".hidden_class/a.png", 50)
    return root


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root, hidden ones too: posix path -> (md5, mtime in ns)."""
    out = {}
    for here, _, files in os.walk(root):
        for name in files:
            path = Path(here, name)
            out[path.relative_to(root).as_posix()] = (hashlib.md5(path.read_bytes()).hexdigest(),
                                                      path.stat().st_mtime_ns)
    return out


def ingest(src: Path, tmp_path: Path, **overrides):
    return ingest_folder(src, tmp_path / "clean", tmp_path / "quarantine", **{**LIMITS, **overrides})


# --- ingest ----------------------------------------------------------------------------------------

def test_ingest_accepts_good_quarantines_bad_and_leaves_source_alone(source, tmp_path):
    before = snapshot(source)
    calls = []
    report = ingest(source, tmp_path, progress=lambda done, total: calls.append((done, total)))

    assert report.classes == {"cat": 3, "dog": 2, "fish": 4}
    expected_bad = BAD_FILES
    assert {r["file"]: r["reason"] for r in report.rejected} == expected_bad
    assert all(r["class"] == r["file"].split("/")[0] for r in report.rejected)
    assert report.rejected_by_reason == {"corrupt": 2, "empty": 1, "not_an_image": 1, "too_large": 1,
                                         "too_small": 1}
    assert report.warnings == []
    assert calls[-1] == (15, 15) and [c[0] for c in calls] == list(range(1, 16))
    json.dumps(report.to_dict())  # plain data, ready for a JSON report

    assert snapshot(source) == before  # bytes and mtimes untouched, nothing added or removed
    clean = snapshot(tmp_path / "clean")
    good = {k for k in before if k not in expected_bad and "/." not in "/" + k}
    assert {k for k in clean if not k.startswith(".")} == good  # only good files (plus our marker)
    assert all(clean[k][0] == before[k][0] for k in good)  # original bytes
    quarantined = snapshot(tmp_path / "quarantine")
    assert {k for k in quarantined if not k.startswith(".")} == set(expected_bad)
    assert all(quarantined[k][0] == before[k][0] for k in expected_bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "quarantine", "src"]  # no temp left


def test_reingest_replaces_previous_output(source, tmp_path):
    ingest(source, tmp_path)
    (source / "dog/b.png").unlink()
    report = ingest(source, tmp_path)
    assert report.classes["dog"] == 1
    assert not (tmp_path / "clean/dog/b.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "quarantine", "src"]


def test_ingest_refuses_foreign_non_empty_dest(source, tmp_path):
    (tmp_path / "clean").mkdir()
    (tmp_path / "clean/notes.txt").write_text("mine")
    with pytest.raises(DataError, match="clean is not empty"):
        ingest(source, tmp_path)
    assert (tmp_path / "clean/notes.txt").read_text() == "mine"


def test_ingest_refuses_dest_inside_source(source, tmp_path):
    with pytest.raises(DataError, match="overlap"):
        ingest_folder(source, source / "clean", tmp_path / "q", **LIMITS)
    with pytest.raises(DataError, match="overlap"):
        ingest_folder(source, tmp_path, tmp_path / "q", **LIMITS)  # replacing dest would drop src


def test_class_with_only_bad_images_is_an_error(tmp_path):
    src = tmp_path / "src"
    good_png(src / "cat/a.png", 1)
    good_png(src / "dog/a.png", 2)
    (src / "bird").mkdir()
    (src / "bird/x.jpg").write_text("text")
    with pytest.raises(DataError) as info:
        ingest(src, tmp_path)
    message = str(info.value)
    assert str(src / "bird") in message and "\n" not in message
    assert not (tmp_path / "clean").exists()  # no half dataset
    assert (tmp_path / "quarantine/bird/x.jpg").is_file()  # but the evidence is kept


def test_imbalance_over_limit_warns(tmp_path):
    src = tmp_path / "src"
    for i in range(11):
        good_png(src / f"many/{i}.png", i)
    good_png(src / "few/0.png", 99)
    report = ingest(src, tmp_path)
    assert len(report.warnings) == 1 and "11.0:1" in report.warnings[0] and "few" in report.warnings[0]
    (src / "many/10.png").unlink()  # 10:1 is not over the limit of 10
    assert ingest(src, tmp_path).warnings == []


def test_duplicates_are_reported_and_a_label_conflict_is_quarantined(source, tmp_path):
    import shutil

    shutil.copy(source / "cat/a.png", source / "cat/sub/a_again.png")  # same class: kept, reported
    shutil.copy(source / "cat/b.png", source / "dog/c.png")  # same bytes, two labels: a conflict
    shutil.copy(source / "cat/b.png", source / "fish/e.png")
    report = ingest(source, tmp_path)

    digest = lambda rel: hashlib.md5((source / rel).read_bytes()).hexdigest()  # noqa: E731
    assert report.duplicates == [
        {"md5": digest("cat/a.png"), "files": ["cat/a.png", "cat/sub/a_again.png"], "classes": ["cat"]},
        {"md5": digest("cat/b.png"), "files": ["cat/b.png", "dog/c.png", "fish/e.png"],
         "classes": ["cat", "dog", "fish"]},
    ]
    assert report.label_conflicts == [{"md5": digest("cat/b.png"), "kept": "cat/b.png",
                                       "quarantined": ["dog/c.png", "fish/e.png"], "classes": ["cat", "dog", "fish"]}]
    conflicts = [r for r in report.rejected if r["reason"] == "label_conflict"]
    assert conflicts == [{"file": "dog/c.png", "class": "dog", "reason": "label_conflict"},
                         {"file": "fish/e.png", "class": "fish", "reason": "label_conflict"}]
    assert report.rejected_by_reason["label_conflict"] == 2
    assert report.classes == {"cat": 4, "dog": 2, "fish": 4}  # the conflicting copies are not counted
    assert sum("duplicate: " in w for w in report.warnings) == 1
    assert sum("label conflict: " in w and "kept cat/b.png" in w for w in report.warnings) == 1
    assert (tmp_path / "clean/cat/b.png").is_file() and (tmp_path / "clean/cat/sub/a_again.png").is_file()
    assert not (tmp_path / "clean/dog/c.png").exists() and not (tmp_path / "clean/fish/e.png").exists()
    assert (tmp_path / "quarantine/dog/c.png").read_bytes() == (source / "cat/b.png").read_bytes()
    assert json.loads(json.dumps(report.to_dict()))["label_conflicts"] == report.label_conflicts


# --- scanning errors: one line, naming the folder ---------------------------------------------------

def assert_one_line_error(root: Path, folder: Path, match: str) -> None:
    for call in (lambda: scan_image_folder(root),
                 lambda: ingest_folder(root, root.parent / "out", root.parent / "q", **LIMITS)):
        with pytest.raises(DataError, match=match) as info:
            call()
        assert str(folder) in str(info.value) and "\n" not in str(info.value)


def test_missing_folder(tmp_path):
    assert_one_line_error(tmp_path / "nope", tmp_path / "nope", "does not exist")


def test_root_is_a_file(tmp_path):
    (tmp_path / "data.zip").write_bytes(b"PK")
    assert_one_line_error(tmp_path / "data.zip", tmp_path / "data.zip", "not a folder")


def test_no_class_folders(tmp_path):
    root = tmp_path / "flat"
    good_png(root / "a.png", 1)
    (root / ".git").mkdir()
    assert_one_line_error(root, root, "no class folders")


def test_single_class(tmp_path):
    good_png(tmp_path / "one/cat/a.png", 1)
    assert_one_line_error(tmp_path / "one", tmp_path / "one", "only one class")


def test_empty_class_folder(tmp_path):
    root = tmp_path / "data"
    good_png(root / "cat/a.png", 1)
    (root / "dog").mkdir()
    (root / "dog/.DS_Store").write_bytes(b"x")  # hidden files do not count
    assert_one_line_error(root, root / "dog", "empty class folder")


def test_scan_labels_sorted_and_hidden_ignored(source):
    classes, files = scan_image_folder(source)
    assert classes == ["cat", "dog", "fish"]
    rel = [(p.relative_to(source).as_posix(), label) for p, label in files]
    assert rel[:5] == [("cat/a.png", 0), ("cat/b.png", 0), ("cat/empty.png", 0), ("cat/sub/c.png", 0),
                       ("cat/truncated.jpg", 0)]
    assert not any("/." in "/" + name for name, _ in rel)
    assert {label for name, label in rel if name.startswith("fish/")} == {2}


# --- hashing, PNG encoding, digits -------------------------------------------------------------------

def test_hash_folder_ignores_hidden_and_sees_bytes_and_names(tmp_path):
    good_png(tmp_path / "d/a/1.png", 1)
    first = hash_folder(tmp_path / "d")
    (tmp_path / "d/.DS_Store").write_bytes(b"x")
    assert hash_folder(tmp_path / "d") == first
    (tmp_path / "d/a/1.png").rename(tmp_path / "d/a/2.png")
    assert hash_folder(tmp_path / "d") != first
    with pytest.raises(DataError, match="missing"):
        hash_folder(tmp_path / "missing")


@pytest.mark.parametrize("shape", [(1, 1), (8, 8), (32, 32), (3, 70), (300, 400)])  # 300x400: >1 block
def test_encode_png_round_trips_through_pillow(tmp_path, shape):
    pixels = np.random.default_rng(shape[0]).integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(pixels)
    (tmp_path / "x.png").write_bytes(data)
    with Image.open(tmp_path / "x.png") as img:
        assert img.mode == "L" and img.size == (shape[1], shape[0])
        assert np.array_equal(np.asarray(img), pixels)
    assert encode_png(pixels) == data  # deterministic


def test_encode_png_rejects_wrong_arrays():
    for bad in (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint16), np.zeros((0, 4), np.uint8)):
        with pytest.raises(ValueError):
            encode_png(bad)


def test_encode_png_idat_is_a_valid_zlib_stream():
    data = encode_png(np.arange(12, dtype=np.uint8).reshape(3, 4))
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8:start - 4], "big")
    assert zlib.decompress(data[start:start + length]) == b"".join(
        b"\x00" + bytes(range(4 * y, 4 * y + 4)) for y in range(3))


def test_write_digits_is_byte_exact_and_idempotent(tmp_path):
    from sklearn.datasets import load_digits  # the test's own reference values

    first = write_digits(tmp_path / "a")
    assert first == {"images": 1797, "classes": 10, "written": 1797}
    assert write_digits(tmp_path / "b")["written"] == 1797
    assert hash_folder(tmp_path / "a") == hash_folder(tmp_path / "b") == DIGITS_HASH
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [str(d) for d in range(10)]
    assert sum(len(list(p.iterdir())) for p in (tmp_path / "a").iterdir()) == 1797

    digits = load_digits()
    index = 1234
    path = tmp_path / "a" / str(digits.target[index]) / f"{index:04d}.png"
    with Image.open(path) as img:
        assert img.mode == "L" and img.size == (32, 32)
        pixels = np.asarray(img)
    expected = (digits.images[index].astype(int) * 255 // 16)
    assert np.array_equal(pixels[::4, ::4], expected) and np.array_equal(pixels[3::4, 3::4], expected)

    path.write_bytes(b"damaged")
    assert write_digits(tmp_path / "a")["written"] == 1  # only the wrong file is rewritten
    assert hash_folder(tmp_path / "a") == DIGITS_HASH
