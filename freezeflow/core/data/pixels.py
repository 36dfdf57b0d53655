"""pixels: an append-only store of decoded, resized images keyed by the md5 of each file's bytes.

prepare decodes a content once, whatever its path or label: a dataset grown by M files decodes
those M, and removing, renaming or relabelling (moving between class folders) decodes nothing.

One store per decode setting, `prepared/.pixels/<S>px-<key>/` (the key hashes DECODE_VERSION,
image_size, max_pixels and min_side: everything that changes the decoded rows or the skip reason):
    pixels-<id>.npy   uint8 (n, 3, S, S): the rows of one batch of newly decoded files
    pixels-<id>.json  that chunk's index: {"rows": [md5 of row 0, ...], "checksum": ..., "skipped": {md5: reason}}
It is a core.chunks store: a run killed mid-prepare leaves at most rows that no index names (no
reader uses them, the next writer removes them), and a chunk whose bytes changed on disk fails its
checksum and is decoded again. Writers hold an exclusive lock on the store (released if the holder dies).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from freezeflow.core.data.preprocess import decode_pixels
from freezeflow.core import chunks
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
    return store_path(out_root, f"{params.image_size}px-{hashlib.sha256(blob.encode()).hexdigest()[:12]}")


def store_path(out_root: Path, name: str) -> Path:
    """The store called `name` (a view's manifest records it) under a prepared folder."""
    return Path(out_root) / ".pixels" / name


PREFIX = "pixels"


def store_lock(store: Path):
    """Hold the store's writer lock; yields False where there is no flock (Windows): then nothing is cleaned."""
    return chunks.store_lock(store)


def remove_orphans(store: Path) -> None:
    chunks.remove_orphans(store, PREFIX)


def read_index(store: Path, verify: bool = False) -> StoreIndex:
    """The union of the committed chunks' indexes. verify=True (under the lock): chunks whose bytes no
    longer match their checksum are deleted first, so their contents count as never decoded."""
    committed = chunks.read_chunks(store, PREFIX)
    if verify:
        committed = chunks.drop_corrupt(store, committed, {c.name for c in committed})
    skipped: dict[str, str] = {}
    for chunk in committed:
        skipped.update(chunk.extra.get("skipped", {}))
    return StoreIndex(chunks.locate(committed), skipped)


def decode_file(path: Path, params: DataParams) -> tuple[np.ndarray | None, str | None]:
    """One file -> (uint8 (3, S, S), None) or (None, reason code): the only place prepare decodes, by the
    decode + resize that predict, evaluate and the served model use (preprocess.decode_pixels)."""
    return decode_pixels(path, params.image_size, params.max_pixels, params.min_side)


def decode_missing(store: Path, todo: list[tuple[Path, str]], params: DataParams,
                   progress: Callable[[int, int], None] | None = None) -> int:
    """Decode each (file, md5) of `todo` into new chunks of `store`; returns how many were decoded.

    Threads decode (PIL releases the GIL); one chunk is committed every CHUNK_BYTES of rows, by a
    writer thread while the next chunk decodes (its checksum and fsync would otherwise idle the decoders).
    """
    size = params.image_size
    per_chunk = max(1, CHUNK_BYTES // (3 * size * size))
    done, pending = 0, None
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool, ThreadPoolExecutor(1) as writer:
        for start in range(0, len(todo), per_chunk):
            batch = todo[start:start + per_chunk]
            rows = np.empty((len(batch), 3, size, size), np.uint8)  # a fresh buffer: the writer may hold the last

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
            if pending is not None:
                pending.result()  # one chunk in flight at most; a failed write stops the prepare here
            pending = writer.submit(write_chunk, store, rows if len(good) == len(rows) else rows[good],
                                    [batch[i][1] for i in good], skipped)
        if pending is not None:
            pending.result()
    return done


def write_chunk(store: Path, rows: np.ndarray, digests: list[str], skipped: dict[str, str]) -> str:
    """Commit one chunk of decoded rows (core.chunks.write_chunk). Returns its name."""
    return chunks.write_chunk(store, PREFIX, rows, digests, {"skipped": skipped})

