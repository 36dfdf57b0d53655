"""prepare: decode and resize each image content once into memory-mappable uint8 rows, plus a split manifest.

The decoded rows live in the pixel store (pixels.py, keyed by each file's md5): prepare decodes only
contents the store lacks, so a grown dataset decodes its new files and a relabelled one nothing.
A prepared dataset (`prepared/<dataset>/<key>/`, the view training reads) holds no pixels of its own:
    rows.npy      int64 (N, 2): (chunk number, row) of each image in the pixel store's chunks
    labels.npy    int64 (N,)
    manifest.json classes, files, md5 per file, split indices, data hash, key, skipped files,
                  decoded (files this build decoded), pixels (the store) and chunks (its chunk names)
`Prepared.images` reads it as one uint8 (N, 3, S, S) array, channel-first so torch.from_numpy gives
model-ready tensors (chunks.ChunkRows over memory-mapped chunks): a new view costs its index, not
a copy of every row. A view whose chunks are gone (pruned, or dropped as corrupt) is rebuilt.
The key hashes the data's content hash with the preprocessing params, so a changed image or a
new image_size gives a new folder. Each file's md5 is read once (prepared/.hashes keeps them per
size and mtime) and serves the data hash, the split and the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from freezeflow.core import chunks
from freezeflow.core.data import pixels
from freezeflow.core.data.folders import combine_digests, md5_file, relative_posix, scan_image_folder
from freezeflow.core.errors import DataError
from freezeflow.core.layout import Layout, resolve_data_params
from freezeflow.core.params import DataParams, Params, SplitParams
from freezeflow.core.io import write_json_atomic

# Bump when the split or the view's layout changes: old views then miss (the decode code has its
# own pixels.DECODE_VERSION, part of the key too).
# 2: the split became a function of each file's content hash (it was a seeded permutation per class).
# 3: a view indexes the pixel store's chunks (rows.npy) instead of copying them into images.npy.
PREPARE_VERSION = 3
STAMP_VERSION = 2  # format of the per-file content-hash stamps in prepared/.hashes


@dataclass(frozen=True)
class Prepared:
    """A prepared dataset: arrays are memory-mapped, never decoded again."""

    root: Path
    images: chunks.ChunkRows  # uint8 (N, 3, S, S) over the pixel store's memory-mapped chunks
    labels: np.ndarray  # int64 (N,)
    classes: list[str]
    split: dict[str, np.ndarray]  # name -> sorted indices into images
    data_hash: str
    key: str
    name: str
    decoded: int = 0  # files decoded by the prepare call that returned this (0: all from the store)
    digests: tuple[str, ...] = ()  # md5 of each row's file bytes: what per-image caches are keyed by
    pixels: str = ""  # the pixel store (decode setting) the rows came from: the rest of a row's identity
    seconds: float = 0.0  # wall time of the prepare call that returned this: scan, hashes, decode, view

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


def compute_key(data_hash: str, params: DataParams) -> str:
    """Cache key: data content + every param that changes the prepared bytes or split."""
    split = params.split
    blob = json.dumps([PREPARE_VERSION, pixels.DECODE_VERSION, data_hash, params.image_size, split.val, split.test, split.seed,
                       params.max_pixels, params.min_side])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- content hashes --------------------------------------------------------------------------------

def resolve_digests(root: Path, files: list[Path], cache_dir: Path,
                    names: list[str] | None = None) -> tuple[str, list[str]]:
    """(data hash, md5 of each file's bytes); a file is re-read only when its size or mtime changed.

    The per-file md5s are kept in one stamp per dataset folder (as DVC does), so a grown dataset
    reads only its new files. The data hash is hash_folder's: md5 over (posix path, md5) pairs.
    `names`: each file's posix path under root, when the caller has them.
    """
    stamp = cache_dir / f"{hashlib.md5(str(root.resolve()).encode()).hexdigest()}.hash.json"
    saved = read_stamp(stamp)
    entries, digests, changed = {}, [], False
    names = names if names is not None else [relative_posix(root, path) for path in files]
    for path, rel in zip(files, names):
        st = os.stat(path)
        known = saved.get(rel)
        if known and known[:2] == [st.st_size, st.st_mtime_ns]:
            file_md5 = known[2]
        else:
            file_md5, changed = md5_file(path), True
        entries[rel] = [st.st_size, st.st_mtime_ns, file_md5]
        digests.append(file_md5)
    if changed or set(entries) != set(saved):
        write_json_atomic(stamp, {"version": STAMP_VERSION, "files": entries}, indent=None)
    return combine_digests([(rel, entry[2]) for rel, entry in entries.items()]), digests


def read_stamp(stamp: Path) -> dict[str, list]:
    """posix path -> [size, mtime_ns, md5] from a stamp; {} when absent, unreadable or of an older format."""
    try:
        saved = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return {}
    return saved.get("files", {}) if saved.get("version") == STAMP_VERSION else {}


# --- the split: a pure function of each file's content ------------------------------------------------

def content_position(digest: str, seed: int) -> float:
    """u in [0, 1) of a file's content: md5 of "seed:md5 of its bytes" as a fraction of 2**128."""
    return int(hashlib.md5(f"{seed}:{digest}".encode()).hexdigest(), 16) / 2 ** 128


def split_bounds(split: SplitParams) -> dict[str, tuple[float, float]]:
    """The interval of u each split takes: test first, then val, the rest train."""
    return {"test": (0.0, split.test), "val": (split.test, split.test + split.val),
            "train": (split.test + split.val, 1.0)}


def split_of(u: float, split: SplitParams) -> str:
    return next(name for name, (lo, hi) in split_bounds(split).items() if lo <= u < hi)


def split_stratified(labels: np.ndarray, digests: list[str], split: SplitParams,
                     classes: list[str]) -> dict[str, np.ndarray]:
    """Each file's split from its content alone; every class appears in train, val and test.

    A file's split depends only on the md5 of its bytes, split.seed and the val/test fractions:
    adding, removing or renaming other files never moves it, and identical files share a split.
    """
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        rows: dict[str, list[int]] = {}  # md5 -> this class's rows with those bytes
        for row in np.flatnonzero(labels == label).tolist():
            rows.setdefault(digests[row], []).append(row)
        if len(rows) < 3:
            copies = " (identical files count once)" if len(rows) < np.sum(labels == label) else ""
            raise DataError(f"class folder '{name}' has {len(rows)} usable images{copies}: every class needs "
                            "at least 3 (one each for train, val and test)")
        where = assign_class({d: content_position(d, split.seed) for d in rows}, split)
        for digest, part in where.items():
            parts[part] += rows[digest]
    return {name: np.array(sorted(ix), dtype=np.int64) for name, ix in parts.items()}


def assign_class(positions: dict[str, float], split: SplitParams) -> dict[str, str]:
    """md5 -> split for one class's distinct contents (at least 3).

    The rule is split_of(u). The one exception, for tiny classes: a split the rule leaves empty
    takes the content nearest its interval (the smallest u, for val and test) from train, or, if
    train has only one, from the other split with two or more. Such a file can move back when its
    class grows and the rule fills that split by itself.
    """
    where = {digest: split_of(u, split) for digest, u in positions.items()}
    bounds = split_bounds(split)
    donors_for = {"test": ("train", "val"), "val": ("train", "test"), "train": ("val", "test")}
    for missing in ("test", "val", "train"):
        counts = Counter(where.values())
        if counts[missing]:
            continue
        donor = next(part for part in donors_for[missing] if counts[part] >= 2)
        lo, hi = bounds[missing]
        gap = lambda d: max(lo - positions[d], positions[d] - hi, 0.0)  # noqa: E731 - distance of u to [lo, hi)
        where[min((d for d in where if where[d] == donor), key=lambda d: (gap(d), d))] = missing
    return where


def prepare_dataset(params: DataParams, out_root: Path = Path("prepared"),
                    progress: Callable[[int, int], None] | None = None) -> Prepared:
    """Decode + resize only contents the pixel store lacks; reuse the prepared view when nothing changed.

    `prepared.decoded` counts the files decoded by this call (0 on a cache hit, M after M new files),
    `prepared.seconds` its wall time (the work alone: no module imports).
    """
    started = time.perf_counter()
    prepared = find_or_build(params, Path(out_root), progress)
    return replace(prepared, seconds=round(time.perf_counter() - started, 4))


def find_or_build(params: DataParams, out_root: Path, progress: Callable[[int, int], None] | None) -> Prepared:
    """The view of params' files: opened when it exists, else built from the store (decoding what it lacks)."""
    root = Path(params.dir)
    classes, items = scan_image_folder(root)
    names = [relative_posix(root, path) for path, _ in items]
    data_hash, digests = resolve_digests(root, [path for path, _ in items], out_root / ".hashes", names)
    key = compute_key(data_hash, params)
    target = out_root / root.resolve().name / key
    if (view := open_view(target)) is not None:
        return view
    store = pixels.store_dir(out_root, params)
    with pixels.store_lock(store) as exclusive:  # one writer per store: parallel prepares decode once
        if (view := open_view(target)) is not None:  # built by the writer we waited for
            return view
        if exclusive:
            pixels.remove_orphans(store)
            remove_stale_views(target)
        todo = missing_contents(items, digests, pixels.read_index(store, verify=exclusive))
        decoded = pixels.decode_missing(store, todo, params, progress)
        listing = Listing(root, classes, [label for _, label in items], names, digests)
        build_prepared(listing, pixels.read_index(store), store, Meta(params, data_hash, key, decoded), target)
    return replace(load_prepared(target), decoded=decoded)


def open_view(target: Path) -> Prepared | None:
    """The prepared view at target, or None when there is none or its pixel chunks are gone (then rebuilt)."""
    if not (target / "manifest.json").exists():
        return None
    try:
        return load_prepared(target)
    except FileNotFoundError:
        return None


def missing_contents(items: list[tuple[Path, int]], digests: list[str],
                     index: pixels.StoreIndex) -> list[tuple[Path, str]]:
    """(first file, md5) of each content the store has never seen: identical files decode once."""
    todo: dict[str, Path] = {}
    for (path, _), digest in zip(items, digests):
        if not index.knows(digest):
            todo.setdefault(digest, path)
    return [(path, digest) for digest, path in todo.items()]


@dataclass(frozen=True)
class Listing:
    """What the scan found: each file's label, posix path under root and md5, in scan order."""

    root: Path
    classes: list[str]
    labels: list[int]
    names: list[str]
    digests: list[str]


@dataclass(frozen=True)
class Meta:
    """What a prepared view records beside its arrays."""

    params: DataParams
    data_hash: str
    key: str
    decoded: int


def remove_stale_views(target: Path) -> None:
    """Temp folders of `target` that a killed prepare left (call under the store lock: same key, same store)."""
    for path in target.parent.glob(f".tmp-{target.name}-*"):
        shutil.rmtree(path, ignore_errors=True)


def build_prepared(listing: Listing, index: pixels.StoreIndex, store: Path, meta: Meta, target: Path) -> None:
    """Write the view (rows.npy: where each row lies in the store, labels, manifest) into a temp folder,
    then rename it into place. Nothing is decoded or copied: a view of N files costs its index.
    Files the store marks unusable are listed in the manifest and left out."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        digests = listing.digests
        keep = [i for i, digest in enumerate(digests) if digest in index.rows]
        skipped = [{"file": str(listing.root / listing.names[i]), "reason": index.skipped.get(digests[i], "unreadable")}
                   for i, digest in enumerate(digests) if digest not in index.rows]
        names = sorted({index.rows[digests[i]][0] for i in keep})
        number = {name: n for n, name in enumerate(names)}
        where = np.array([(number[index.rows[digests[i]][0]], index.rows[digests[i]][1]) for i in keep],
                         dtype=np.int64).reshape(-1, 2)  # (N, 2): chunk number, row
        np.save(tmp / "rows.npy", where)
        labels = np.array([listing.labels[i] for i in keep], dtype=np.int64)
        np.save(tmp / "labels.npy", labels)
        kept_digests = [digests[i] for i in keep]
        split = split_stratified(labels, kept_digests, meta.params.split, listing.classes)
        manifest = {
            "key": meta.key, "data_hash": meta.data_hash, "dir": str(listing.root), "classes": listing.classes,
            "files": [listing.names[i] for i in keep], "digests": kept_digests,
            "split": {k: v.tolist() for k, v in split.items()}, "image_size": meta.params.image_size,
            "skipped": skipped, "decoded": meta.decoded, "pixels": store.name, "chunks": names,
        }
        write_json_atomic(tmp / "manifest.json", manifest, indent=None)  # compact: it lists every file
        replace_view(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_view(tmp: Path, target: Path) -> None:
    """Rename tmp to target; a stale view there (its chunks gone) is moved aside first, then deleted."""
    if target.exists():
        aside = target.with_name(f".tmp-{target.name}-stale-{os.getpid()}")
        os.replace(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(tmp, target)


def load_prepared(target: Path) -> Prepared:
    """Open a prepared view; FileNotFoundError when it, or a pixel chunk it names, is gone."""
    manifest = json.loads((target / "manifest.json").read_text())
    store = pixels.store_path(target.parent.parent, manifest["pixels"])
    for name in manifest["chunks"]:  # a chunk counts only while its index exists (chunks.py)
        if not (store / f"{name}.json").exists():
            raise FileNotFoundError(f"{store / name}.json: a pixel chunk of {target} is gone")
    return Prepared(
        root=target,
        images=chunks.open_rows(store, manifest["chunks"], np.load(target / "rows.npy")),
        labels=np.load(target / "labels.npy"),
        classes=manifest["classes"],
        split={k: np.asarray(v, dtype=np.int64) for k, v in manifest["split"].items()},
        data_hash=manifest["data_hash"],
        key=manifest["key"],
        name=target.parent.name,
        digests=tuple(manifest["digests"]),
        pixels=manifest["pixels"],
    )


def open_prepared(params: Params, layout: Layout, progress: Callable[[int, int], None] | None = None) -> Prepared:
    """The prepared data of params.data, in layout.prepared: decoded once, then a cache hit."""
    return prepare_dataset(resolve_data_params(params, layout.root).data, layout.prepared, progress)
