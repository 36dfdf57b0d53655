"""Append-only chunk stores: rows of one shape, addressed by string keys, committed chunk by chunk.

Both content-addressed caches use it: decoded pixels (core.data.pixels, keyed by each file's md5)
and frozen-prefix features (core.train.features, keyed by md5 and augmentation view). A store is a
folder of chunks:
    <prefix>-<id>.npy    the rows of one chunk, (n, ...)
    <prefix>-<id>.json   its index: {"rows": [key of row 0, ...], "checksum": "sha256:<hex>", ...}
A chunk counts only once its index exists. The rows are written first (temp name, fsync, rename:
core.io.open_atomic), then the index, so a writer killed at any point leaves at most rows that no
index names: no reader uses them and the next writer removes them. The checksum covers the rows'
bytes: a chunk whose bytes changed on disk is detected (`drop_corrupt`) and removed, never read.
Writers hold the store's exclusive lock, which the kernel releases if the holder dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from freezeflow.core.io import open_atomic, write_json_atomic


@dataclass(frozen=True)
class Chunk:
    """One committed chunk: its name (file stem), the key of each row, its checksum and extra index fields."""

    name: str
    keys: list[str]
    checksum: str | None  # None: written before checksums existed (trusted as is)
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def store_lock(store: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold the store's exclusive writer lock. Yields True when held; False where there is no flock
    (Windows: then nothing is cleaned), or when blocking=False and another process holds it."""
    try:
        import fcntl
    except ImportError:
        store.mkdir(parents=True, exist_ok=True)
        yield False
        return
    while True:
        store.mkdir(parents=True, exist_ok=True)
        with open(store / ".lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            if os.fstat(handle.fileno()).st_nlink == 0:  # the store was pruned while we waited: lock anew
                continue
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
            return


def remove_orphans(store: Path, prefix: str) -> None:
    """Delete what killed writers left: temp files and rows without an index (call under the lock)."""
    for path in store.glob(f".{prefix}-*.tmp"):
        path.unlink(missing_ok=True)
    for path in store.glob(f"{prefix}-*.npy"):
        if not path.with_suffix(".json").exists():
            path.unlink(missing_ok=True)


def read_chunks(store: Path, prefix: str) -> list[Chunk]:
    """The committed chunks, oldest name first; an index that cannot be read (or lost its rows) counts as absent."""
    chunks = []
    for index in sorted(store.glob(f"{prefix}-*.json")):
        if not index.with_suffix(".npy").exists():
            continue
        try:
            entry = json.loads(index.read_text())
            keys = list(entry.pop("rows"))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        chunks.append(Chunk(index.stem, keys, entry.pop("checksum", None), entry))
    return chunks


def locate(chunks: list[Chunk]) -> dict[str, tuple[str, int]]:
    """key -> (chunk name, row); the first chunk holding a key wins."""
    where: dict[str, tuple[str, int]] = {}
    for chunk in chunks:
        for row, key in enumerate(chunk.keys):
            where.setdefault(key, (chunk.name, row))
    return where


def rows_checksum(rows: np.ndarray) -> str:
    """sha256 of the rows' bytes (C order), ~1.4 GB/s here."""
    return "sha256:" + hashlib.sha256(memoryview(np.ascontiguousarray(rows)).cast("B")).hexdigest()


def write_chunk(store: Path, prefix: str, rows: np.ndarray, keys: list[str], extra: dict | None = None) -> str:
    """Commit one chunk: rows first (temp name, fsync, rename), then its index. Returns its name."""
    name = f"{prefix}-{uuid.uuid4().hex[:16]}"  # unique: a chunk is never overwritten
    rows = np.ascontiguousarray(rows)
    with open_atomic(store / f"{name}.npy") as handle:
        np.save(handle, rows)
    write_json_atomic(store / f"{name}.json", {"rows": keys, "checksum": rows_checksum(rows), **(extra or {})})
    return name


def chunk_is_intact(store: Path, chunk: Chunk) -> bool:
    """The chunk's rows load and match its checksum (a legacy chunk without one: if they load)."""
    try:
        rows = np.load(store / f"{chunk.name}.npy", mmap_mode="r")
        return chunk.checksum is None or rows_checksum(rows) == chunk.checksum
    except (OSError, ValueError):
        return False


def drop_corrupt(store: Path, chunks: list[Chunk], names: set[str]) -> list[Chunk]:
    """Check the chunks named in `names`; delete those that fail (index first: no reader sees them
    again), and return the chunks that remain. Call under the lock."""
    kept = []
    for chunk in chunks:
        if chunk.name in names and not chunk_is_intact(store, chunk):
            (store / f"{chunk.name}.json").unlink(missing_ok=True)
            (store / f"{chunk.name}.npy").unlink(missing_ok=True)
            continue
        kept.append(chunk)
    return kept


def copy_rows(store: Path, locations: list[tuple[str, int]], out: np.ndarray) -> None:
    """out[i] = the store's row locations[i]; one memory-map per chunk."""
    by_chunk: dict[str, tuple[list[int], list[int]]] = {}
    for i, (chunk, row) in enumerate(locations):
        dst, src = by_chunk.setdefault(chunk, ([], []))
        dst.append(i)
        src.append(row)
    for chunk, (dst, src) in by_chunk.items():
        rows = np.load(store / f"{chunk}.npy", mmap_mode="r")
        out[np.asarray(dst)] = rows[np.asarray(src)]


def store_bytes(store: Path) -> int:
    """Bytes on disk of everything in a store folder."""
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
