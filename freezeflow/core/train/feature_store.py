"""The shared frozen-feature store: one row per (image content, augmentation view), kept on disk.

A pretrained prefix's output for an image depends on the image's pixels, the prefix's weights and
cut level, the preprocessing, and the augmentation view; nothing else. So features are addressed
per image, and a retrain on grown data computes rows only for the new images.

    cache/features/<backbone>-L<k>-<id>/   one store per (backbone, cut level k, prefix weights,
                                          decode setting, FEATURE_VERSION): `store_name`
        rows-<id>.npy / .json              core.chunks: fp16 rows (n, C, H, W), keyed "<md5>:<view>"
        store.json                         what the store is (for `freezeflow cache list`)
        .used                              touched on every read: least recently used goes first
    cache/features/<backbone>-adabn-<key>.pt   AdaBN statistics (core.models.batchnorm)

<md5> is the md5 of the image file's bytes; <view> is `plain`, or `a<v>-<hash of augmentation params
and seed>` for augmented view v. The prefix's identity is a hash of its weights and buffers, so a
new weights file, AdaBN statistics or a fine-tuned checkpoint gets its own store, and the same
weights from two paths share one. Writers hold the store's lock while they compute, so two
trainings at once compute each row once; `prune_entries` keeps the folder under cache.max_gb.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from freezeflow.core import chunks
from freezeflow.core.data.augment import AUGMENT_VERSION
from freezeflow.core.io import write_json_atomic
from freezeflow.core.params import AugmentParams

FEATURE_VERSION = 5  # 2: BN folded; 3: augmentation seeded per batch; 4: AdaBN; 5: rows per image, seeded per image
PREFIX = "rows"


def prefix_digest(stages: list[torch.nn.Module]) -> str:
    """sha256 of the prefix's parameters and buffers (names, dtypes, shapes, bytes): its identity."""
    h = hashlib.sha256()
    for i, stage in enumerate(stages):
        for name, tensor in stage.state_dict().items():
            t = tensor.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{i}.{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
            h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def store_name(backbone: str, level: int, digest: str, source: str) -> str:
    """Folder of the store of `backbone`'s first `level` stages with weights `digest`, over rows decoded
    with setting `source` (the pixel store's name)."""
    blob = json.dumps([FEATURE_VERSION, backbone, level, digest, source])
    return f"{entry_stem(backbone)}-L{level}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def entry_stem(backbone: str) -> str:
    """A backbone name as one path component: `timm/resnet18` -> `timm+resnet18` (one entry, not a folder)."""
    return backbone.replace("/", "+")


def view_ids(views: int, augment: AugmentParams | None, seed: int) -> list[str]:
    """The views of a train image: `plain`, or one id per augmented view (params and seed hashed in)."""
    if not views or augment is None:
        return ["plain"]
    tag = hashlib.sha256(json.dumps([asdict(augment), seed, AUGMENT_VERSION]).encode()).hexdigest()[:10]
    return [f"a{v}-{tag}" for v in range(views)]


def view_seed(digest: str, view: str) -> int:
    """The seed of one image's augmented view: a function of its content and the view alone."""
    return int(hashlib.md5(f"{view}:{digest}".encode()).hexdigest()[:15], 16)


def missing_keys(store: Path, keys: list[str]) -> list[str]:
    """Keys the store lacks, each once, in first-seen order (call under the lock). Removes what killed
    writers left, and checks the chunks these keys would be read from: a corrupt one is deleted, so
    its rows count as missing and are computed again."""
    chunks.remove_orphans(store, PREFIX)
    committed = chunks.read_chunks(store, PREFIX)
    where = chunks.locate(committed)
    needed = {where[k][0] for k in keys if k in where}
    where = chunks.locate(chunks.drop_corrupt(store, committed, needed))
    return list(dict.fromkeys(k for k in keys if k not in where))


def write_rows(store: Path, rows: np.ndarray, keys: list[str]) -> None:
    chunks.write_chunk(store, PREFIX, rows.astype(np.float16, copy=False), keys)


def describe_store(store: Path, about: dict) -> None:
    """store.json: what `freezeflow cache list` shows (written once)."""
    if not (store / "store.json").exists():
        write_json_atomic(store / "store.json", about | {"feature_version": FEATURE_VERSION})


def open_stored_rows(store: Path, keys: list[str], views: int) -> chunks.ViewRows:
    """(V, N, ...) fp16 of `keys` (view-major: V*N keys, all present), read in place from the store's
    memory-mapped chunks: nothing is copied up front (a grown dataset's N old rows cost no gather), and a
    later prune cannot pull rows from under a training (an unlinked file stays readable while mapped)."""
    where = chunks.locate(chunks.read_chunks(store, PREFIX))
    rows = chunks.open_located(store, [where[k] for k in keys])
    n = len(keys) // views
    (store / ".used").touch()
    if views == 1:
        return chunks.ViewRows([rows])
    return chunks.ViewRows([chunks.ChunkRows(rows.arrays, rows.where[v * n:(v + 1) * n]) for v in range(views)])


# --- entries: what `freezeflow cache list` shows and `prune` removes ------------------------------------

@dataclass(frozen=True)
class CacheEntry:
    """One entry of cache/features: a feature store, AdaBN statistics, or a folder of an older format."""

    path: Path
    kind: str  # features | adabn | legacy
    size_bytes: int
    rows: int
    last_used: float  # epoch seconds
    about: dict

    def to_dict(self) -> dict:
        return {"name": self.path.name, "kind": self.kind, "size_bytes": self.size_bytes,
                "size_mb": round(self.size_bytes / 2**20, 2),
                "rows": self.rows, "last_used": time.strftime("%Y-%m-%d %H:%M", time.localtime(self.last_used)),
                **{k: self.about[k] for k in ("backbone", "level") if k in self.about}}


def list_entries(root: Path) -> list[CacheEntry]:
    """Every entry under `root` (cache/features), least recently used first."""
    if not root.is_dir():
        return []
    entries = []
    for path in root.iterdir():
        if path.name.startswith("."):
            continue
        if path.is_file():
            entries.append(CacheEntry(path, "adabn" if path.suffix == ".pt" else "legacy", path.stat().st_size, 0,
                                      path.stat().st_mtime, {}))
            continue
        committed = chunks.read_chunks(path, PREFIX)
        used = path / ".used"
        about = read_about(path)
        entries.append(CacheEntry(path, "features" if committed or about else "legacy", chunks.store_bytes(path),
                                  sum(len(c.keys) for c in committed),
                                  (used if used.exists() else path).stat().st_mtime, about))
    return sorted(entries, key=lambda e: (e.last_used, e.path.name))


def read_about(store: Path) -> dict:
    try:
        return json.loads((store / "store.json").read_text())
    except (OSError, ValueError):
        return {}


def remove_entry(entry: CacheEntry) -> bool:
    """Delete an entry unless a training holds its lock now (then it is in use: False)."""
    if entry.path.is_file():
        entry.path.unlink(missing_ok=True)
        return True
    with chunks.store_lock(entry.path, blocking=False) as held:
        if not held:
            return False
        shutil.rmtree(entry.path, ignore_errors=True)
    return True


def prune_entries(root: Path, max_bytes: int | None = None, older_than_s: float | None = None,
                  keep: frozenset[str] = frozenset()) -> list[CacheEntry]:
    """Remove entries last used more than older_than_s ago, then the least recently used until the
    rest fits in max_bytes. Entries named in `keep` (in use by this process) and locked ones stay.
    Returns what was removed."""
    entries = list_entries(root)
    total = sum(e.size_bytes for e in entries)
    removed = []
    for entry in entries:  # least recently used first
        stale = older_than_s is not None and time.time() - entry.last_used > older_than_s
        over = max_bytes is not None and total > max_bytes
        if entry.path.name in keep or not (stale or over):
            continue
        if remove_entry(entry):
            total -= entry.size_bytes
            removed.append(entry)
    return removed
