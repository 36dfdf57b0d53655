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
The index also records the rows file's stat (size, mtime, ctime, inode) when it was written or last
verified; as git and DVC do, a file whose stat is unchanged is not read again, so a check costs a
stat per chunk, and only a changed, moved or restored file is read in full (any write to a file
changes its mtime and ctime; bit rot that leaves both untouched is beyond this check).
Writers hold the store's exclusive lock, which the kernel releases if the holder dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
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
    stat: tuple[int, ...] | None = None  # file_stat of the rows when written or last verified


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
            stat = tuple(entry.pop("stat")) if "stat" in entry else None
        except (OSError, ValueError, KeyError, TypeError):
            continue
        chunks.append(Chunk(index.stem, keys, entry.pop("checksum", None), entry, stat))
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
    write_index(store, Chunk(name, keys, rows_checksum(rows), extra or {}, file_stat(store / f"{name}.npy")))
    return name


def write_index(store: Path, chunk: Chunk) -> None:
    """The chunk's index: what commits it (compact JSON: it lists every row's key)."""
    entry = {"rows": chunk.keys, "checksum": chunk.checksum, **chunk.extra}
    if chunk.stat is not None:
        entry["stat"] = list(chunk.stat)
    write_json_atomic(store / f"{chunk.name}.json", entry, indent=None)


def file_stat(path: Path) -> tuple[int, ...]:
    """(size, mtime_ns, ctime_ns, inode): what any write to, or replacement of, the file changes."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def chunk_is_unchanged(store: Path, chunk: Chunk) -> bool:
    """The rows file has the stat its index recorded: not written to since it was checked."""
    try:
        return chunk.stat is not None and file_stat(store / f"{chunk.name}.npy") == chunk.stat
    except OSError:
        return False


def chunk_is_intact(store: Path, chunk: Chunk) -> bool:
    """The chunk's rows load and match its checksum (a legacy chunk without one: if they load)."""
    try:
        with open(store / f"{chunk.name}.npy", "rb") as handle:
            shape, _, dtype = read_header(handle)
            if chunk.checksum is None:
                return True
            digest, size = hashlib.sha256(), 0
            while block := handle.read(READ_BLOCK):  # plain reads: ~4x faster than a cold memory-map
                digest.update(block)
                size += len(block)
        return size == int(np.prod(shape)) * dtype.itemsize and "sha256:" + digest.hexdigest() == chunk.checksum
    except (OSError, ValueError):
        return False


READ_BLOCK = 8 << 20


def read_header(handle) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an open .npy file, leaving it at the first row's byte."""
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(handle)
    if fortran:
        raise ValueError("chunks are C-order")
    return shape, fortran, dtype


def drop_corrupt(store: Path, chunks: list[Chunk], names: set[str]) -> list[Chunk]:
    """Check the chunks named in `names` whose file changed since its last check: delete those that
    fail their checksum (index first: no reader sees them again), record the new stat of those that
    pass, and return the chunks that remain. Call under the lock."""
    kept = []
    for chunk in chunks:
        if chunk.name in names and not chunk_is_unchanged(store, chunk):
            if not chunk_is_intact(store, chunk):
                (store / f"{chunk.name}.json").unlink(missing_ok=True)
                (store / f"{chunk.name}.npy").unlink(missing_ok=True)
                continue
            if chunk.checksum is not None:  # verified as it is now: not read again until it changes
                chunk = replace(chunk, stat=file_stat(store / f"{chunk.name}.npy"))
                write_index(store, chunk)
        kept.append(chunk)
    return kept


def store_bytes(store: Path) -> int:
    """Bytes on disk of everything in a store folder."""
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file())


class ChunkRows:
    """Rows spread over a store's chunks, read as one (N, ...) array without copying them together.

    Row i is row where[i, 1] of arrays[where[i, 0]] (memory-mapped chunks). Indexing with an int, a
    slice, a bool mask or an int array returns an ndarray: one fancy-index per chunk the rows touch.
    A dataset grown by M rows thus needs only its M new rows written, not a copy of all N.
    """

    def __init__(self, arrays: list[np.ndarray], where: np.ndarray):
        shapes = {(a.shape[1:], a.dtype) for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"chunks of different row shapes or dtypes: {sorted(map(str, shapes))}")
        self.arrays, self.where = arrays, np.asarray(where, dtype=np.int64).reshape(-1, 2)
        row_shape, self.dtype = next(iter(shapes)) if shapes else ((), np.dtype(np.uint8))
        self.shape = (len(self.where), *row_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            array, row = self.where[key]
            return np.asarray(self.arrays[array][row])
        if isinstance(key, tuple):
            raise TypeError("ChunkRows takes one index (int, slice, mask or int array): select rows first")
        idx = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        picked = self.where[idx]  # (n, 2): IndexError for a row out of range, as an array gives
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        for array in np.unique(picked[:, 0]):
            hit = picked[:, 0] == array
            out[hit] = self.arrays[array][picked[hit, 1]]
        return out

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)


class ViewRows:
    """(V, N, ...) rows: V views of N rows each, view v a ChunkRows. `rows[v]` is that ChunkRows,
    `rows[v, idx]` an ndarray (idx as ChunkRows takes it), np.asarray(rows) a copy of all of them."""

    def __init__(self, views: list[ChunkRows]):
        if not views or len({(v.shape, v.dtype) for v in views}) > 1:
            raise ValueError("ViewRows needs one or more views of one shape and dtype")
        self.views, self.dtype = views, views[0].dtype
        self.shape = (len(views), *views[0].shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.views)

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, key):
        if isinstance(key, tuple) and len(key) == 2:
            return self.views[key[0]][key[1]]
        if isinstance(key, (int, np.integer)):
            return self.views[key]
        raise TypeError("ViewRows takes a view (int) or a view and rows (v, idx)")

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.stack([np.asarray(v) for v in self.views])
        return out if dtype is None else out.astype(dtype)


def open_located(store: Path, locations: list[tuple[str, int]]) -> ChunkRows:
    """ChunkRows of the rows at `locations` ((chunk name, row) each, as `locate` gives them), in that order."""
    names = list(dict.fromkeys(chunk for chunk, _ in locations))
    number = {name: n for n, name in enumerate(names)}
    where = np.array([(number[chunk], row) for chunk, row in locations], dtype=np.int64).reshape(-1, 2)
    return open_rows(store, names, where)


def open_rows(store: Path, names: list[str], where: np.ndarray) -> ChunkRows:
    """ChunkRows over the named chunks of a store; FileNotFoundError naming the first chunk that is gone."""
    return ChunkRows([np.load(store / f"{name}.npy", mmap_mode="r") for name in names], where)
