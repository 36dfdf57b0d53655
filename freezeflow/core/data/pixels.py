"""pixels: an append-only store of decoded, resized images keyed by the md5 of each file's bytes.

prepare decodes a content once, whatever its path or label: a dataset grown by M files decodes
those M, and removing, renaming or relabelling (moving between class folders) decodes nothing.

One store per decode setting, `prepared/.pixels/<S>px-<key>/` (the key hashes DECODE_VERSION,
image_size, max_pixels and min_side: everything that changes the decoded rows or the skip reason):
    pixels-<id>.npy   uint8 (n, 3, S, S): the rows of one batch of newly decoded files
    pixels-<id>.json  that chunk's index: {"rows": [md5 of row 0, ...], "skipped": {md5: reason}}
A chunk counts only once its index exists. The rows are written to a temp name, fsynced and
renamed (core.io.open_atomic), and only then the index, so a run killed mid-prepare leaves at
most rows that no index names; no reader ever uses them, and the next writer removes them.
Writers hold an exclusive lock on the store (released if the holder dies).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from freezeflow.core.data.images import read_rgb
from freezeflow.core.data.preprocess import resize_pixels
from freezeflow.core.io import open_atomic, write_json_atomic
from freezeflow.core.params import DataParams

DECODE_VERSION = 1  # bump when the decode (images) or resize (preprocess) code changes: old rows then miss
CHUNK_BYTES = 64 << 20  # rows decoded between two commits: what a killed run can lose, at most
TRANSIENT = {"unreadable"}  # an I/O error is not a property of the bytes: retried next time, never stored


@dataclass(frozen=True)
class StoreIndex:
    """What a store holds: md5 -> (chunk name, row), and md5 -> reason for unusable contents."""

    rows: dict[str, tuple[str, int]]
    skipped: dict[str, str]

    def knows(self, digest: str) -> bool:
        return digest in self.rows or digest in self.skipped


def store_dir(out_root: Path, params: DataParams) -> Path:
    blob = json.dumps([DECODE_VERSION, params.image_size, params.max_pixels, params.min_side])
    return Path(out_root) / ".pixels" / f"{params.image_size}px-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def store_lock(store: Path) -> Iterator[bool]:
    """Hold the store's writer lock; yields False where there is no flock (Windows): then nothing is cleaned."""
    store.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(store / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_orphans(store: Path) -> None:
    """Delete what killed writers left: temp files and rows without an index (call under the lock)."""
    for path in store.glob(".pixels-*.tmp"):
        path.unlink(missing_ok=True)
    for path in store.glob("pixels-*.npy"):
        if not path.with_suffix(".json").exists():
            path.unlink(missing_ok=True)


def read_index(store: Path) -> StoreIndex:
    """The union of the committed chunks' indexes; one that cannot be read (or lost its rows) counts as absent."""
    rows: dict[str, tuple[str, int]] = {}
    skipped: dict[str, str] = {}
    for index in sorted(store.glob("pixels-*.json")):
        if not index.with_suffix(".npy").exists():
            continue
        try:
            entry = json.loads(index.read_text())
        except (OSError, ValueError):
            continue
        for row, digest in enumerate(entry["rows"]):
            rows.setdefault(digest, (index.stem, row))
        skipped.update(entry["skipped"])
    return StoreIndex(rows, skipped)


def decode_file(path: Path, params: DataParams) -> tuple[np.ndarray | None, str | None]:
    """One file -> (uint8 (3, S, S), None) or (None, reason code): the only place prepare decodes."""
    img, reason = read_rgb(path, params.max_pixels, params.min_side)
    if img is None:
        return None, reason
    return resize_pixels(img, params.image_size), None


def decode_missing(store: Path, todo: list[tuple[Path, str]], params: DataParams,
                   progress: Callable[[int, int], None] | None = None) -> int:
    """Decode each (file, md5) of `todo` into new chunks of `store`; returns how many were decoded.

    Threads decode (PIL releases the GIL); one chunk is committed every CHUNK_BYTES of rows.
    """
    size = params.image_size
    per_chunk = max(1, CHUNK_BYTES // (3 * size * size))
    done = 0
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(todo), per_chunk):
            batch = todo[start:start + per_chunk]
            rows = np.empty((len(batch), 3, size, size), np.uint8)

            def decode_into(i: int) -> str | None:
                pixels, reason = decode_file(batch[i][0], params)
                if pixels is not None:
                    rows[i] = pixels
                return reason

            reasons = []
            for reason in pool.map(decode_into, range(len(batch))):
                reasons.append(reason)
                done += 1
                if progress:
                    progress(done, len(todo))
            good = [i for i, reason in enumerate(reasons) if reason is None]
            skipped = {batch[i][1]: r for i, r in enumerate(reasons) if r is not None and r not in TRANSIENT}
            write_chunk(store, rows[good], [batch[i][1] for i in good], skipped)
    return done


def write_chunk(store: Path, rows: np.ndarray, digests: list[str], skipped: dict[str, str]) -> str:
    """Commit one chunk: rows first (temp name, fsync, rename), then its index. Returns its name."""
    name = f"pixels-{uuid.uuid4().hex[:16]}"  # unique: a chunk is never overwritten
    with open_atomic(store / f"{name}.npy") as handle:
        np.save(handle, np.ascontiguousarray(rows))
    write_json_atomic(store / f"{name}.json", {"rows": digests, "skipped": skipped})
    return name


def copy_rows(store: Path, locations: list[tuple[str, int]], out: np.ndarray) -> None:
    """out[i] = the store's row locations[i], for out uint8 (N, 3, S, S); one memory-map per chunk."""
    by_chunk: dict[str, tuple[list[int], list[int]]] = {}
    for i, (chunk, row) in enumerate(locations):
        dst, src = by_chunk.setdefault(chunk, ([], []))
        dst.append(i)
        src.append(row)
    for chunk, (dst, src) in by_chunk.items():
        pixels = np.load(store / f"{chunk}.npy", mmap_mode="r")
        out[np.asarray(dst)] = pixels[np.asarray(src)]
