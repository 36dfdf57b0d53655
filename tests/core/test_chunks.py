"""core.chunks on real files: rows read across chunks (ChunkRows, ViewRows) equal the rows written,
and a chunk's checksum catches changed or missing bytes."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from freezeflow.core import chunks


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 3, 4)).astype(np.float16)
    b = rng.standard_normal((30, 3, 4)).astype(np.float16)
    names = [chunks.write_chunk(tmp_path, "rows", a, [f"a{i}" for i in range(50)]),
             chunks.write_chunk(tmp_path, "rows", b, [f"b{i}" for i in range(30)])]
    return tmp_path, names, (a, b)


def test_open_located_and_view_rows_read_runs_and_scattered_rows(store):
    """What the feature store hands training: rows at (chunk, row) locations, in place, split into views."""
    root, (na, nb), (a, b) = store
    runs = [(na, i) for i in range(10, 40)] + [(nb, i) for i in range(5, 25)] + [(na, 3), (nb, 0), (na, 49)]
    scattered = [(na, int(i)) for i in np.random.default_rng(1).permutation(50)] + [(nb, 29), (nb, 2)]
    for locations in (runs, scattered):
        expected = np.stack([(a if n == na else b)[r] for n, r in locations])
        rows = chunks.open_located(root, locations)
        assert rows.shape == expected.shape and np.array_equal(np.asarray(rows), expected)
        half = len(locations) // 2
        views = chunks.ViewRows([chunks.ChunkRows(rows.arrays, rows.where[:half]),
                                 chunks.ChunkRows(rows.arrays, rows.where[half:2 * half])])
        assert views.shape == (2, half, 3, 4) and views.ndim == 4 and len(views) == 2
        assert np.array_equal(views[1, [0, half - 1]], expected[[half, 2 * half - 1]])
        assert np.array_equal(views[0][5:9], expected[5:9])
        assert np.array_equal(np.asarray(views), expected[:2 * half].reshape(2, half, 3, 4))
    with pytest.raises(TypeError, match="view"):
        views[0, 1, 2]
    with pytest.raises(ValueError, match="one shape"):
        chunks.ViewRows([rows, chunks.ChunkRows(rows.arrays, rows.where[:3])])


def test_chunk_rows_index_like_one_array(store):
    root, names, (a, b) = store
    where = np.array([(1, 4), (0, 0), (0, 1), (1, 29), (0, 49)])
    view = chunks.open_rows(root, names, where)
    whole = np.stack([(a, b)[c][r] for c, r in where])
    assert view.shape == (5, 3, 4) and view.dtype == np.float16 and len(view) == 5 and view.ndim == 3
    assert view.nbytes == whole.nbytes
    assert np.array_equal(view[3], whole[3]) and np.array_equal(view[-1], whole[-1])
    for key in (slice(None), slice(1, 4), slice(None, None, -2), np.array([4, 0, 0, 2]), whole[:, 0, 0] > 0,
                np.array([], dtype=np.int64)):
        assert np.array_equal(view[key], whole[key])
    assert np.array_equal(np.asarray(view), whole) and np.array_equal(np.stack(list(view)), whole)
    with pytest.raises(IndexError):
        view[np.array([5])]
    with pytest.raises(TypeError):
        view[0, 1]
    (root / f"{names[0]}.npy").unlink()
    with pytest.raises(FileNotFoundError):
        chunks.open_rows(root, names, where)


def test_a_chunk_with_changed_or_missing_bytes_fails_its_checksum(store):
    root, names, _ = store
    committed = {c.name: c for c in chunks.read_chunks(root, "rows")}
    assert all(chunks.chunk_is_intact(root, c) for c in committed.values())
    path = root / f"{names[0]}.npy"
    data = bytearray(path.read_bytes())
    data[-10:] = bytes(10)  # header intact, a row's bytes zeroed
    path.write_bytes(bytes(data))
    assert not chunks.chunk_is_intact(root, committed[names[0]])
    other = root / f"{names[1]}.npy"
    other.write_bytes(other.read_bytes()[:-24])  # truncated: one row short
    assert not chunks.chunk_is_intact(root, committed[names[1]])
    # a later write moves the file's mtime; within one timestamp tick of the commit it may not, so say so
    os.utime(path, ns=(os.stat(path).st_atime_ns, committed[names[0]].stat[1] + 10**9))
    assert not chunks.chunk_is_unchanged(root, committed[names[0]])
    assert chunks.drop_corrupt(root, list(committed.values()), set(names)) == []
    assert not list(root.glob("rows-*"))


def test_a_check_reads_only_files_changed_since_the_last_one(store, tmp_path):
    """The index records the rows file's stat: an untouched chunk costs a stat, a copied (or restored)
    one is read in full once, passes, and has its new stat recorded."""
    root, names, (a, _) = store
    committed = chunks.read_chunks(root, "rows")
    assert all(chunks.chunk_is_unchanged(root, c) for c in committed)  # recorded when written
    copy = root.parent / f"{root.name}-copy"
    shutil.copytree(root, copy)  # new inodes: every chunk counts as changed
    moved = chunks.read_chunks(copy, "rows")
    assert not any(chunks.chunk_is_unchanged(copy, c) for c in moved)
    kept = chunks.drop_corrupt(copy, moved, {c.name for c in moved})
    assert [c.name for c in kept] == [c.name for c in moved]
    assert all(chunks.chunk_is_unchanged(copy, c) for c in chunks.read_chunks(copy, "rows"))
    assert np.array_equal(np.load(copy / f"{names[0]}.npy"), a)
