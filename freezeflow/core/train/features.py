"""Frozen-feature cache: a frozen prefix gives the same output every epoch, so compute it once.

`FeatureCache.level(k)` returns the output of stages 0..k-1 for every image of each split, as
fp16 numpy arrays (in RAM, or memory-mapped past the memory budget): (V, N, C, H, W) for train (V augmented views, cycled by epoch) and (1, N, ...) for val and
test. Features of a *pretrained* prefix are stored on disk under a key (data, backbone, weights,
k, preprocessing, views) and reused across epochs, runs and sweep trials. Features of a prefix
this run has trained (FreezeOut) live only as long as the run, extended stage by stage.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from freezeflow.core.train import distributed
from freezeflow.core.data.augment import augment_batch
from freezeflow.core.params import AugmentParams, TrainParams
from freezeflow.core.io import open_atomic

FEATURE_VERSION = 4  # 2: BatchNorm folded into convs for extraction; 3: augmentation seeded per batch; 4: AdaBN


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
        bn.forward = torch.nn.Identity().forward  # type: ignore[method-assign]
    return len(pairs)


@torch.no_grad()
def make_inference_prefix(stages: list[torch.nn.Module], example: torch.Tensor) -> torch.nn.Module:
    """A frozen prefix made fast for inference: BatchNorm folded into convs, channels_last.

    Checked against the original on `example`; any mismatch falls back to the original stages.
    """
    original = torch.nn.Sequential(*stages).eval()
    fast = copy.deepcopy(original)
    fold_batchnorm(fast, example)
    fast = fast.to(memory_format=torch.channels_last)
    expected, got = original(example), fast(example.contiguous(memory_format=torch.channels_last))
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()) + 1e-6):
        return original
    return fast


def feature_key(data_key: str, backbone: str, weights: str, level: int, augment: AugmentParams | None,
                views: int, seed: int, bn_adapt: bool = False) -> str:
    """Everything that changes a pretrained prefix's output. A local weights file adds its stat;
    bn_adapt: BatchNorm statistics re-estimated on the training images (freezeflow.core.models.batchnorm)."""
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

    key_fn: Callable[[int], str]  # level k -> disk key of a pretrained prefix's features (see feature_key)
    root: Path | None  # shared cache folder (cache/features); None: nothing is stored
    run_root: Path | None = None  # where run-local (trained-prefix) levels live, for an exact resume
    memory_mb: int = 2048  # levels larger than this stay memory-mapped
    augment: AugmentParams | None = None
    views: int = 0  # augmented views per train image; 0: the images as they are
    seed: int = 0
    batch_size: int = 256


def feature_spec(backbone: str, data_key: str, train: TrainParams, root: Path | None,
                 run_root: Path | None) -> FeatureSpec:
    """The cache of a training with `train` params on the prepared data `data_key`."""
    def key_fn(k: int) -> str:
        return f"{backbone}-L{k}-" + feature_key(data_key, backbone, train.weights, k, train.augment,
                                                 train.augment_views, train.seed, train.bn_adapt)

    return FeatureSpec(key_fn, root, run_root, train.feature_memory_mb, train.augment, train.augment_views,
                       train.seed)


class FeatureCache:
    """Features of the frozen prefix for splits train/val/test, built once and extended on demand.
    The prefix runs on the model's device."""

    def __init__(self, model: torch.nn.Module, images: np.ndarray, split: dict[str, np.ndarray],
                 normalize: Callable[[torch.Tensor], torch.Tensor], spec: FeatureSpec,
                 world: distributed.World | None = None):
        self.model, self.images, self.split, self.normalize, self.spec = model, images, split, normalize, spec
        self.device = next(model.parameters()).device
        self.memory_bytes = spec.memory_mb * 2**20
        self.progress: Callable[[str, int, int], None] | None = None  # (label, done, total), e.g. a bar
        self.world = world or distributed.World()  # under torchrun each rank builds a part of each level
        self.current: tuple[int, dict[str, np.ndarray]] | None = None  # (level, split -> features)
        self.trained_from: int | None = None  # lowest stage index this run has trained
        self.builds = 0  # how many levels were computed (not loaded): for tests and reports

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
        """Load from disk or build. A prefix this run trained (FreezeOut) is grown from the level
        below and kept with the checkpoint (exact resume); a pretrained prefix is shared by key."""
        pretrained = self.trained_from is None or k <= self.trained_from
        if pretrained:
            folder = self.spec.root / self.spec.key_fn(k) if self.spec.root is not None else None
            build = lambda part: self.compute(name, k, part)  # noqa: E731
        else:
            folder = self.spec.run_root / f"L{k}" if self.spec.run_root is not None else None
            if previous is not None and name in previous[1]:
                build = lambda part: self.extend(previous[1][name], previous[0], k, part)  # noqa: E731
            else:
                build = lambda part: self.compute(name, k, part)  # noqa: E731
        if folder is None:  # nowhere to share parts: every rank builds the whole level
            return build(None)
        return self.load_or_build(folder / f"{name}.npy", build, len(self.split[name]))

    def reset_run_local(self) -> None:
        """A fresh (not resumed) run: features of an earlier run's trained prefix are stale."""
        if self.spec.run_root is not None:
            shutil.rmtree(self.spec.run_root, ignore_errors=True)

    def views_for(self, name: str) -> int:
        return max(self.spec.views, 1) if name == "train" else 1

    def batch_starts(self, n: int, part: tuple[int, int] | None) -> range:
        """Row offsets of the batches to compute: all, or batches [lo, hi) of this rank's part."""
        lo, hi = part if part is not None else (0, -(-n // self.spec.batch_size))
        return range(lo * self.spec.batch_size, min(hi * self.spec.batch_size, n), self.spec.batch_size)

    @torch.no_grad()
    def compute(self, name: str, k: int, part: tuple[int, int] | None = None) -> np.ndarray:
        """(V, n, ...) fp16 on the CPU: images of split `name` (all, or the batches of `part`)
        through stages 0..k-1. Augmentation is seeded per (view, batch): parts match a whole build."""
        self.builds += 1
        for stage in self.model.stages[:k]:
            stage.eval()  # frozen stages: running statistics, never batch statistics
        idx = self.split[name]
        starts = self.batch_starts(len(idx), part)
        example = self.normalize(torch.from_numpy(self.images[idx[:2]]).to(self.device))
        prefix = make_inference_prefix(list(self.model.stages[:k]), example)
        views, first = self.views_for(name), starts.start if starts else 0
        n_rows = min(starts.stop, len(idx)) - first if starts else 0
        out = torch.empty((views, n_rows, *prefix(example[:1]).shape[1:]), dtype=torch.float16)  # (V, n, ...)
        for view in range(views):
            for i, start in enumerate(starts):
                rows = idx[start:start + self.spec.batch_size]
                x = self.normalize(torch.from_numpy(self.images[rows]).to(self.device))
                if name == "train" and self.spec.views:
                    gen = torch.Generator().manual_seed((self.spec.seed * 7919 + view) * 1_000_003 + start)
                    x = augment_batch(x, self.spec.augment, gen)
                x = prefix(x.contiguous(memory_format=torch.channels_last))
                out[view, start - first:start - first + len(rows)] = x.to("cpu", torch.float16)
                if self.progress is not None:
                    self.progress(f"features {name} (stages 0..{k - 1})", view * len(starts) + i + 1,
                                  views * len(starts))
        return out.numpy()

    @torch.no_grad()
    def extend(self, src: np.ndarray, k0: int, k: int, part: tuple[int, int] | None = None) -> np.ndarray:
        """Apply stages k0..k-1 to cached level-k0 features (V, N, ...) (no image is touched)."""
        self.builds += 1
        for stage in self.model.stages[k0:k]:
            stage.eval()
        example = torch.from_numpy(np.array(src[0, :2])).to(self.device).float()
        prefix = make_inference_prefix(list(self.model.stages[k0:k]), example)
        starts = self.batch_starts(src.shape[1], part)
        chunks = []
        for view in range(src.shape[0]):
            for start in starts:
                rows = src[view, start:start + self.spec.batch_size]
                x = torch.from_numpy(np.array(rows))  # a copy: a memmap is read-only
                x = prefix(x.to(self.device).float().contiguous(memory_format=torch.channels_last))
                chunks.append(x.to("cpu", torch.float16).contiguous())
        if not chunks:
            return np.empty((src.shape[0], 0, *prefix(example[:1]).shape[1:]), dtype=np.float16)
        return torch.cat(chunks).unflatten(0, (src.shape[0], -1)).numpy()

    def load_or_build(self, path: Path, build: Callable, n: int) -> np.ndarray:
        """Load a level's split from disk, or build it first (by parts across ranks under torchrun)."""
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
