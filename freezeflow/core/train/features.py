"""Frozen-feature cache: a frozen prefix gives the same output every epoch, so compute it once.

`FeatureCache.level(k)` returns the output of stages 0..k-1 for every image of each split, as fp16
(V, N, C, H, W) for train (V augmented views, cycled by epoch) and (1, N, ...) for val and test: read in
place from the store's memory-mapped chunks (chunks.ViewRows) for a pretrained prefix, numpy arrays
(in RAM, or memory-mapped past train.feature_memory_mb) for a prefix this run trained. Features of a *pretrained*
prefix come from the shared per-image store (core.train.feature_store: one row per image content
and view), so epochs, runs, sweep trials and retrains on grown data compute each row once.
Features of a prefix this run has trained (FreezeOut) live only as long as the run, extended
stage by stage.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from freezeflow.core import chunks
from freezeflow.core.train import distributed, feature_store
from freezeflow.core.train.feature_store import FEATURE_VERSION
from freezeflow.core.data.augment import augment_batch, augment_seeded
from freezeflow.core.params import AugmentParams, TrainParams
from freezeflow.core.io import open_atomic
from freezeflow.core.errors import UserError

CHUNK_BYTES = 64 << 20  # feature rows computed between two commits: what a killed run can lose, at most
EXTRACT_BATCH = 256  # images per forward pass of the frozen prefix (no gradients: larger than train batches)


@torch.no_grad()
def fold_batchnorm(module: torch.nn.Module, example: torch.Tensor) -> int:
    """Fold each eval-mode BatchNorm2d into the Conv2d whose output it normalizes, in place.

    Pairs are found by following tensors through one forward pass (a BN whose input is exactly a
    conv's output), so it works for any backbone. Returns the number of pairs folded.
    """
    produced: dict[int, torch.nn.Conv2d] = {}
    pairs: list[tuple[torch.nn.Conv2d, torch.nn.BatchNorm2d]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: produced.__setitem__(id(o), m))
             for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks += [m.register_forward_hook(lambda m, i, o: pairs.append((produced[id(i[0])], m))
                                      if id(i[0]) in produced else None)
              for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    module(example)
    for hook in hooks:
        hook.remove()
    for conv, bn in pairs:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.bias = torch.nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
        bn.forward = folded_forward(bn)  # type: ignore[method-assign]
    return len(pairs)


def folded_forward(bn: torch.nn.BatchNorm2d) -> Callable[[torch.Tensor], torch.Tensor]:
    """What is left of a BatchNorm once folded: nothing, or the dropout + activation that a fused
    norm-act layer (timm's BatchNormAct2d: batch_norm, then drop, then act) runs after it."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if isinstance(drop, torch.nn.Module) and isinstance(act, torch.nn.Module):
        return lambda x: act(drop(x))
    return torch.nn.Identity().forward


@torch.no_grad()
def make_inference_prefix(stages: list[torch.nn.Module], example: torch.Tensor) -> torch.nn.Module:
    """A frozen prefix made fast for inference: BatchNorm folded into convs, channels_last.

    Checked against the original on `example`; any mismatch falls back to the original stages.
    """
    original = torch.nn.Sequential(*stages).eval()
    fast = copy.deepcopy(original)
    fold_batchnorm(fast, example)
    fast = fast.to(memory_format=torch.channels_last)
    with exact_float32():  # TF32 convs (a CUDA default) differ by more than the 1e-3 the check allows
        expected, got = original(example), fast(example.contiguous(memory_format=torch.channels_last))
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()) + 1e-6):
        error = float((got - expected).abs().max() / (expected.abs().max() + 1e-12))
        print(f"note: frozen prefix of {len(stages)} stage(s): BatchNorm folding changed the output by {error:.2e} "
              "(relative); features are computed by the unfolded stages", file=sys.stderr)
        original.bn_folded = False  # read by tests and the GPU check
        return original
    fast.bn_folded = True
    return fast


@contextlib.contextmanager
def exact_float32():
    """TF32 off for convolutions and matmuls inside the block (restored after)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class HalfRows:
    """Features leave the device as fp16: converted there (half the bytes cross the bus), copied without
    blocking into pinned host memory, and checked for values fp16 cannot hold (above 65504: inf) with one
    flag per batch kept on the device and read once, at the end."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        self.device = device
        self.out = torch.empty(shape, dtype=torch.float16, pin_memory=device.type == "cuda")
        self.finite: list[torch.Tensor] = []

    def put(self, index: tuple, x: torch.Tensor) -> None:
        half = x.to(torch.float16)
        self.finite.append(torch.isfinite(half).all())
        self.out[index].copy_(half, non_blocking=True)

    def result(self, level: int) -> np.ndarray:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the non-blocking copies have landed
        if self.finite and not bool(torch.stack(self.finite).all()):
            raise UserError(f"params/train.yaml: cache_features: the frozen features at level {level} overflow "
                            "fp16 (values above 65504); allowed: cache_features: off for this backbone and cut")
        return self.out.numpy()


def feature_key(data_key: str, backbone: str, weights: str, level: int, augment: AugmentParams | None,
                views: int, seed: int, bn_adapt: bool = False) -> str:
    """Key of what depends on the whole dataset (AdaBN statistics, freezeflow.core.models.batchnorm): the
    data, backbone and weights (a local weights file adds its stat). Per-image features are keyed by
    feature_store instead."""
    weights_id = weights
    if Path(weights).is_file():
        st = Path(weights).stat()
        weights_id = f"{Path(weights).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    blob = json.dumps([FEATURE_VERSION, data_key, backbone, weights_id, level,
                       asdict(augment) if augment and views else None, views, seed if views else None,
                       bool(bn_adapt)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FeatureSpec:
    """What a cached level depends on and where it is kept: built once per trainer by `feature_spec`."""

    backbone: str
    source: str  # the decode setting of the rows (the pixel store's name): part of each stored row's identity
    root: Path | None  # shared cache folder (cache/features); None: nothing is stored
    run_root: Path | None = None  # where run-local (trained-prefix) levels live, for an exact resume
    memory_mb: int = 2048  # run-local (FreezeOut) levels larger than this stay memory-mapped
    augment: AugmentParams | None = None
    views: int = 0  # augmented views per train image; 0: the images as they are
    seed: int = 0
    batch_size: int = 256
    max_bytes: int = 0  # disk budget of root (train.cache.max_gb); 0: unbounded


def feature_spec(backbone: str, source: str, train: TrainParams, root: Path | None,
                 run_root: Path | None) -> FeatureSpec:
    """The cache of a training with `train` params on rows decoded with setting `source`."""
    return FeatureSpec(backbone, source, root, run_root, train.feature_memory_mb, train.augment, train.augment_views,
                       train.seed, EXTRACT_BATCH, int(train.cache.max_gb * 2**30))


def row_digests(images: np.ndarray) -> tuple[str, ...]:
    """md5 of each decoded row: the content address where file digests are not known."""
    return tuple(hashlib.md5(memoryview(np.ascontiguousarray(row)).cast("B")).hexdigest() for row in images)


class FeatureCache:
    """Features of the frozen prefix for splits train/val/test, built once and extended on demand.
    The prefix runs on the model's device."""

    def __init__(self, model: torch.nn.Module, images: np.ndarray, split: dict[str, np.ndarray],
                 normalize: Callable[[torch.Tensor], torch.Tensor], spec: FeatureSpec,
                 world: distributed.World | None = None, digests: tuple[str, ...] = ()):
        self.model, self.images, self.split, self.normalize, self.spec = model, images, split, normalize, spec
        self.digests = digests or row_digests(images)  # (N,) content address of each image row
        self.device = next(model.parameters()).device
        self.memory_bytes = spec.memory_mb * 2**20
        self.progress: Callable[[str, int, int], None] | None = None  # (label, done, total), e.g. a bar
        self.world = world or distributed.World()  # under torchrun each rank builds a part of each level
        self.current: tuple[int, dict[str, np.ndarray]] | None = None  # (level, split -> features)
        self.trained_from: int | None = None  # lowest stage index this run has trained
        self.builds = 0  # how many (split, level) arrays needed computing: for tests and reports
        self.rows_computed = 0  # feature rows (image x view) this process computed, not loaded
        self.stores: dict[int, Path] = {}  # level -> its store (store_path)
        self.prefixes: dict[int, torch.nn.Module] = {}  # level -> its inference prefix, for stored levels
        self.build_seconds = 0.0  # time spent producing features: store checks, computing, opening

    def mark_trained(self, lowest_trainable: int) -> None:
        """Stages >= lowest_trainable have been trained in this run: their outputs are run-local."""
        if self.trained_from is None or lowest_trainable < self.trained_from:
            self.trained_from = lowest_trainable

    def level(self, k: int, names: tuple[str, ...] = ("train", "val")) -> dict[str, np.ndarray]:
        """Features after stages 0..k-1 for the splits `names` (test only when asked: after training)."""
        same = self.current is not None and self.current[0] == k
        previous = self.current if self.current is not None and self.current[0] < k else None
        feats = dict(self.current[1]) if same else {}
        for name in names:
            if name not in feats:
                feats[name] = self.split_level(k, name, previous)
        self.current = (k, feats)
        return feats

    def split_level(self, k: int, name: str, previous: tuple | None) -> np.ndarray:
        """From the shared store, for a pretrained prefix; a prefix this run trained (FreezeOut) is
        grown from the level below and kept with the checkpoint (exact resume)."""
        if self.trained_from is None or k <= self.trained_from:
            if self.spec.root is None:  # nothing is stored: every rank computes the whole level
                return self.compute(name, k)
            return self.stored_level(k, name)
        folder = self.spec.run_root / f"L{k}" if self.spec.run_root is not None else None
        if previous is not None and name in previous[1]:
            build = lambda part: self.extend(previous[1][name], previous[0], k, part)  # noqa: E731
        else:
            build = lambda part: self.compute(name, k, part)  # noqa: E731
        if folder is None:
            return build(None)
        return self.load_or_build(folder / f"{name}.npy", build, len(self.split[name]))

    def reset_run_local(self) -> None:
        """A fresh (not resumed) run: features of an earlier run's trained prefix are stale."""
        if self.spec.run_root is not None:
            shutil.rmtree(self.spec.run_root, ignore_errors=True)

    def view_ids(self, name: str) -> list[str]:
        """The views a split is cached in: the train split's augmented views, else `plain`."""
        if name == "train":
            return feature_store.view_ids(self.spec.views, self.spec.augment, self.spec.seed)
        return ["plain"]

    # ---- the shared store ----------------------------------------------------------------------------
    def store_path(self, k: int) -> Path:
        """The store of level k; the prefix's weights are hashed once per level (stages below the
        lowest trained one never change, and only those come from the store)."""
        if k not in self.stores:
            digest = feature_store.prefix_digest(list(self.model.stages[:k]))
            self.stores[k] = self.spec.root / feature_store.store_name(self.spec.backbone, k, digest, self.spec.source)
        return self.stores[k]

    def stored_level(self, k: int, name: str) -> chunks.ViewRows:
        """(V, N, ...) of split `name` from the store; rows it lacks are computed first, under its lock
        (a second training waits, then finds them). Under torchrun each rank computes a part."""
        started = time.perf_counter()
        store, views = self.store_path(k), self.view_ids(name)
        keys = [f"{self.digests[i]}:{view}" for view in views for i in self.split[name]]  # view-major
        lock = chunks.store_lock(store) if self.world.is_main else contextlib.nullcontext()
        with lock:
            missing = distributed.broadcast_object(feature_store.missing_keys(store, keys)
                                                   if self.world.is_main else None)
            if missing:
                self.builds += 1
                self.compute_missing(store, k, missing, f"features {name} (stages 0..{k - 1})")
                if self.world.is_main:
                    feature_store.describe_store(store, {"backbone": self.spec.backbone, "level": k,
                                                         "source": self.spec.source})
            distributed.barrier()
            out = feature_store.open_stored_rows(store, keys, len(views))
        if self.spec.max_bytes and self.world.is_main:
            feature_store.prune_entries(self.spec.root, self.spec.max_bytes, keep=frozenset({store.name}))
        self.build_seconds += time.perf_counter() - started  # checks, computing and opening: all of it
        return out

    def compute_missing(self, store: Path, k: int, missing: list[str], label: str) -> None:
        """Compute this rank's part of the `missing` keys ("<md5>:<view>") and commit them chunk by chunk."""
        row_of = {d: i for i, d in reversed(list(enumerate(self.digests)))}  # md5 -> first row with it
        lo, hi = distributed.split_range(len(missing), self.world)
        by_view: dict[str, list[str]] = {}
        for key in missing[lo:hi]:
            by_view.setdefault(key.rpartition(":")[2], []).append(key)
        done, total = 0, hi - lo
        if total and k not in self.prefixes:  # built once per level: stored levels' stages never change
            self.prefixes[k] = self.inference_prefix(k)
        prefix = self.prefixes.get(k)
        for view, keys in by_view.items():
            rows = np.array([row_of[key.rpartition(":")[0]] for key in keys], dtype=np.int64)
            pos, block = 0, self.spec.batch_size  # the first block measures a row; then ~CHUNK_BYTES each
            while pos < len(rows):
                feats = self.compute_rows(k, rows[pos:pos + block], [view], prefix)[0]  # (n, C, H, W)
                feature_store.write_rows(store, feats, keys[pos:pos + len(feats)])
                pos, done = pos + len(feats), done + len(feats)
                block = max(self.spec.batch_size, CHUNK_BYTES // max(1, feats[0].nbytes))
                if self.progress is not None:
                    self.progress(label, done, total)

    def compute(self, name: str, k: int, part: tuple[int, int] | None = None) -> np.ndarray:
        """(V, n, ...) fp16: split `name`'s images (all, or the batches of `part`) through stages 0..k-1."""
        idx = self.split[name]
        if part is not None:
            idx = idx[part[0] * self.spec.batch_size:part[1] * self.spec.batch_size]
        self.builds += 1
        return self.compute_rows(k, idx, self.view_ids(name))

    @torch.no_grad()
    def inference_prefix(self, k: int) -> torch.nn.Module:
        """Stages 0..k-1 made fast for inference (make_inference_prefix), as they are now."""
        for stage in self.model.stages[:k]:
            stage.eval()  # frozen stages: running statistics, never batch statistics
        example = self.normalize(torch.from_numpy(self.images[self.split["train"][:2]]).to(self.device))
        return make_inference_prefix(list(self.model.stages[:k]), example)

    @torch.no_grad()
    def compute_rows(self, k: int, rows: np.ndarray, views: list[str],
                     prefix: torch.nn.Module | None = None) -> np.ndarray:
        """(len(views), n, ...) fp16 on the CPU: image rows through stages 0..k-1 (or `prefix`, built from
        them). An augmented view of an image is seeded by its content and the view
        (feature_store.view_seed): the same in any batch."""
        started = time.perf_counter()
        prefix = prefix if prefix is not None else self.inference_prefix(k)
        example = self.normalize(torch.from_numpy(self.images[self.split["train"][:1]]).to(self.device))
        out = HalfRows((len(views), len(rows), *prefix(example).shape[1:]), self.device)
        for v, view in enumerate(views):
            for start in range(0, len(rows), self.spec.batch_size):
                batch = rows[start:start + self.spec.batch_size]
                x = self.normalize(torch.from_numpy(self.images[batch]).to(self.device))
                if view != "plain":
                    seeds = [feature_store.view_seed(self.digests[i], view) for i in batch]
                    x = augment_seeded(x, self.spec.augment, seeds)
                x = prefix(x.contiguous(memory_format=torch.channels_last))
                out.put((v, slice(start, start + len(batch))), x)
        features = out.result(k)
        self.rows_computed += len(views) * len(rows)
        if self.spec.root is None or (self.trained_from is not None and k > self.trained_from):
            self.build_seconds += time.perf_counter() - started  # not inside stored_level's own clock
        return features

    @torch.no_grad()
    def extend(self, src: np.ndarray, k0: int, k: int, part: tuple[int, int] | None = None) -> np.ndarray:
        """Apply stages k0..k-1 to cached level-k0 features (V, N, ...) (no image is touched)."""
        self.builds += 1
        for stage in self.model.stages[k0:k]:
            stage.eval()
        example = torch.from_numpy(np.array(src[0, :2])).to(self.device).float()
        prefix = make_inference_prefix(list(self.model.stages[k0:k]), example)
        lo, hi = part if part is not None else (0, -(-src.shape[1] // self.spec.batch_size))
        first, end = lo * self.spec.batch_size, min(hi * self.spec.batch_size, src.shape[1])
        out = HalfRows((src.shape[0], max(end - first, 0), *prefix(example[:1]).shape[1:]), self.device)
        for view in range(src.shape[0]):
            for start in range(first, end, self.spec.batch_size):
                rows = src[view, start:start + self.spec.batch_size]
                x = torch.from_numpy(np.array(rows))  # a copy: a memmap is read-only
                x = prefix(x.to(self.device).float().contiguous(memory_format=torch.channels_last))
                out.put((view, slice(start - first, start - first + len(rows))), x)
        return out.result(k)

    def load_or_build(self, path: Path, build: Callable, n: int) -> np.ndarray:
        """Load a run-local level's split from disk, or build it first (by parts across ranks under torchrun)."""
        if not distributed.broadcast_object(path.exists()):  # rank 0 decides: all ranks take one branch
            if self.world.enabled:
                self.build_shared(path, build, n)
            else:
                write_array(path, build(None))
        array = np.load(path, mmap_mode="r")
        if array.nbytes <= self.memory_bytes:  # small enough: hold in RAM, else stay memory-mapped
            array = np.ascontiguousarray(array)
        return array

    def build_shared(self, path: Path, build: Callable, n: int) -> None:
        """Each rank computes its contiguous run of batches; rank 0 joins the parts in rank order."""
        part_path = path.with_name(f".{path.stem}.part{self.world.rank}.npy")
        write_array(part_path, build(distributed.split_range(-(-n // self.spec.batch_size), self.world)))
        distributed.barrier()
        if self.world.is_main:
            parts = [path.with_name(f".{path.stem}.part{r}.npy") for r in range(self.world.size)]
            write_array(path, np.concatenate([np.load(p, mmap_mode="r") for p in parts], axis=1))
            for p in parts:
                p.unlink()
        distributed.barrier()


def write_array(path: Path, array: np.ndarray) -> None:
    """Write to a temp file, then rename: readers never see a half-written cache. Two workers
    writing the same key write identical bytes, so the last rename wins harmlessly."""
    with open_atomic(path) as handle:
        np.save(handle, array)
