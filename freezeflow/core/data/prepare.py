"""prepare: decode and resize every image once into memory-mappable uint8 arrays, plus a split manifest.

Layout of one prepared dataset (`prepared/<dataset>/<key>/`):
    images.npy    uint8 (N, 3, S, S): channel-first so torch.from_numpy gives model-ready tensors
    labels.npy    int64 (N,)
    manifest.json classes, files, split indices, data hash, key, skipped files
The key hashes the data's content hash with the preprocessing params, so a changed image or a
new image_size gives a new folder and training never decodes an image file again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from freezeflow.core.data.folders import scan_image_folder
from freezeflow.core.errors import DataError
from freezeflow.core.data.images import read_rgb
from freezeflow.core.data.preprocess import resize_pixels
from freezeflow.core.layout import Layout, resolve_data_params
from freezeflow.core.params import DataParams, Params, SplitParams
from freezeflow.core.io import write_json_atomic

PREPARE_VERSION = 1  # bump when the decode (images) or resize (preprocess) code changes: old caches then miss


@dataclass(frozen=True)
class Prepared:
    """A prepared dataset: arrays are memory-mapped, never decoded again."""

    root: Path
    images: np.ndarray  # uint8 (N, 3, S, S), memory-mapped
    labels: np.ndarray  # int64 (N,)
    classes: list[str]
    split: dict[str, np.ndarray]  # name -> sorted indices into images
    data_hash: str
    key: str
    name: str

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


def fingerprint_files(files: list[Path], root: Path) -> list[list]:
    """(relative path, size, mtime_ns) per file: lets us skip re-hashing unchanged data."""
    out = []
    for path in files:
        st = path.stat()
        out.append([path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return out


def hash_files(files: list[Path], root: Path) -> str:
    """Content hash of the dataset: md5 over (relative path, md5 of bytes), sorted by path."""
    digest = hashlib.md5()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        file_md5 = hashlib.md5(path.read_bytes()).hexdigest()
        digest.update(f"{path.relative_to(root).as_posix()}\0{file_md5}\n".encode())
    return digest.hexdigest()


def compute_key(data_hash: str, params: DataParams) -> str:
    """Cache key: data content + every param that changes the prepared bytes or split."""
    split = params.split
    blob = json.dumps([PREPARE_VERSION, data_hash, params.image_size, split.val, split.test, split.seed,
                       params.max_pixels, params.min_side])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_stratified(labels: np.ndarray, split: SplitParams, classes: list[str]) -> dict[str, np.ndarray]:
    """Deterministic stratified split; every class appears in train, val and test."""
    rng = np.random.default_rng(split.seed)
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        idx = np.flatnonzero(labels == label)
        if len(idx) < 3:
            raise DataError(f"class folder '{name}' has {len(idx)} usable images: every class needs at least 3 "
                            "(one each for train, val and test)")
        idx = idx[rng.permutation(len(idx))]
        n_val = max(1, int(round(len(idx) * split.val)))
        n_test = max(1, int(round(len(idx) * split.test)))
        n_val, n_test = min(n_val, len(idx) - 2), min(n_test, len(idx) - 2)
        parts["val"] += idx[:n_val].tolist()
        parts["test"] += idx[n_val:n_val + n_test].tolist()
        parts["train"] += idx[n_val + n_test:].tolist()
    return {name: np.array(sorted(ix), dtype=np.int64) for name, ix in parts.items()}


def resolve_data_hash(root: Path, files: list[Path], cache_dir: Path) -> str:
    """Content hash, re-read only when a file's size or mtime changed (as DVC does)."""
    fp = fingerprint_files(files, root)
    stamp = cache_dir / f"{hashlib.md5(str(root.resolve()).encode()).hexdigest()}.hash.json"
    if stamp.exists():
        saved = json.loads(stamp.read_text())
        if saved.get("files") == fp:
            return saved["hash"]
    data_hash = hash_files(files, root)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stamp, {"files": fp, "hash": data_hash})
    return data_hash


def prepare_dataset(params: DataParams, out_root: Path = Path("prepared"),
                    progress: Callable[[int, int], None] | None = None) -> Prepared:
    """Decode + resize once; reuse the prepared arrays when data and params are unchanged."""
    root = Path(params.dir)
    classes, items = scan_image_folder(root)
    files = [path for path, _ in items]
    data_hash = resolve_data_hash(root, files, out_root / ".hashes")
    key = compute_key(data_hash, params)
    name = root.resolve().name
    target = out_root / name / key
    if (target / "manifest.json").exists():
        return load_prepared(target)
    build_prepared(root, classes, items, params, data_hash, key, target, progress)
    return load_prepared(target)


def decode_all(items: list[tuple[Path, int]], params: DataParams, images: np.ndarray,
               progress: Callable[[int, int], None] | None) -> list[dict]:
    """Fill `images` (N, 3, S, S) in place with threads (PIL releases the GIL while decoding)."""
    skipped: list[dict] = []

    def decode_one(i: int) -> dict | None:
        path = items[i][0]
        img, reason = read_rgb(path, params.max_pixels, params.min_side)  # one decode per file
        if img is None:
            return {"file": str(path), "reason": reason}
        images[i] = resize_pixels(img, params.image_size)  # (3, S, S)
        return None

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        for done, result in enumerate(pool.map(decode_one, range(len(items))), 1):
            if result:
                skipped.append(result)
            if progress:
                progress(done, len(items))
    return skipped


def build_prepared(root: Path, classes: list[str], items: list[tuple[Path, int]], params: DataParams,
                   data_hash: str, key: str, target: Path,
                   progress: Callable[[int, int], None] | None) -> None:
    """Write arrays + manifest into a temp folder, then rename it into place (never half-written)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        size = params.image_size
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(items), 3, size, size))
        skipped = decode_all(items, params, images, progress)
        bad = {s["file"] for s in skipped}
        keep = np.array([i for i, (p, _) in enumerate(items) if str(p) not in bad], dtype=np.int64)
        labels = np.array([items[i][1] for i in keep], dtype=np.int64)
        if len(keep) < len(items):  # compact: drop rows of skipped files
            compact = np.lib.format.open_memmap(tmp / "images.tmp.npy", mode="w+", dtype=np.uint8,
                                                shape=(len(keep), 3, size, size))
            compact[:] = images[keep]
            compact.flush()
            del images, compact
            os.replace(tmp / "images.tmp.npy", tmp / "images.npy")
        else:
            images.flush()
            del images
        np.save(tmp / "labels.npy", labels)
        split = split_stratified(labels, params.split, classes)
        manifest = {
            "key": key, "data_hash": data_hash, "dir": str(root), "classes": classes,
            "files": [items[i][0].relative_to(root).as_posix() for i in keep],
            "split": {k: v.tolist() for k, v in split.items()},
            "image_size": size, "skipped": skipped,
        }
        write_json_atomic(tmp / "manifest.json", manifest)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_prepared(target: Path) -> Prepared:
    manifest = json.loads((target / "manifest.json").read_text())
    return Prepared(
        root=target,
        images=np.load(target / "images.npy", mmap_mode="r"),
        labels=np.load(target / "labels.npy"),
        classes=manifest["classes"],
        split={k: np.asarray(v, dtype=np.int64) for k, v in manifest["split"].items()},
        data_hash=manifest["data_hash"],
        key=manifest["key"],
        name=target.parent.name,
    )


def open_prepared(params: Params, layout: Layout, progress: Callable[[int, int], None] | None = None) -> Prepared:
    """The prepared data of params.data, in layout.prepared: decoded once, then a cache hit."""
    return prepare_dataset(resolve_data_params(params, layout.root).data, layout.prepared, progress)
