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
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from freezeflow.augment import augment_batch
from freezeflow.params import AugmentParams

FEATURE_VERSION = 2  # 2: BatchNorm folded into convs for extraction


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


def normalize_batch(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float (B, 3, S, S) normalized as the backbone's weights expect."""
    return (x.float().div_(255.0) - mean) / std


def feature_key(data_key: str, backbone: str, weights: str, level: int, augment: AugmentParams | None,
                views: int, seed: int) -> str:
    """Everything that changes a pretrained prefix's output. A local weights file adds its stat."""
    weights_id = weights
    if Path(weights).is_file():
        st = Path(weights).stat()
        weights_id = f"{Path(weights).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    blob = json.dumps([FEATURE_VERSION, data_key, backbone, weights_id, level,
                       asdict(augment) if augment and views else None, views, seed if views else None])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class FeatureCache:
    """Features of the frozen prefix for splits train/val/test, built once and extended on demand."""

    def __init__(self, model: torch.nn.Module, images: np.ndarray, split: dict[str, np.ndarray],
                 normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 key_fn: Callable[[int], str], root: Path | None, memory_mb: int,
                 augment: AugmentParams | None, views: int, seed: int, batch_size: int = 256,
                 run_root: Path | None = None):
        self.model, self.images, self.split = model, images, split
        self.normalize, self.device, self.key_fn = normalize, device, key_fn
        self.root, self.memory_bytes = root, memory_mb * 2**20
        self.augment, self.views, self.seed, self.batch_size = augment, views, seed, batch_size
        self.progress: Callable[[str, int, int], None] | None = None  # (label, done, total), e.g. a bar
        self.run_root = run_root  # where run-local (trained-prefix) levels live, for an exact resume
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
            folder = self.root / self.key_fn(k) if self.root is not None else None
            build = lambda: self.compute(name, k)  # noqa: E731
        else:
            folder = self.run_root / f"L{k}" if self.run_root is not None else None
            if previous is not None and name in previous[1]:
                build = lambda: self.extend(previous[1][name], previous[0], k)  # noqa: E731
            else:
                build = lambda: self.compute(name, k)  # noqa: E731
        return self.load_or_build(folder / f"{name}.npy", build) if folder is not None else build()

    def reset_run_local(self) -> None:
        """A fresh (not resumed) run: features of an earlier run's trained prefix are stale."""
        if self.run_root is not None:
            shutil.rmtree(self.run_root, ignore_errors=True)

    def views_for(self, name: str) -> int:
        return max(self.views, 1) if name == "train" else 1

    @torch.no_grad()
    def compute(self, name: str, k: int) -> np.ndarray:
        """(V, N, ...) fp16 on the CPU: run images of split `name` through stages 0..k-1."""
        self.builds += 1
        for stage in self.model.stages[:k]:
            stage.eval()  # frozen stages: running statistics, never batch statistics
        idx = self.split[name]
        example = self.normalize(torch.from_numpy(self.images[idx[:2]]).to(self.device))
        prefix = make_inference_prefix(list(self.model.stages[:k]), example)
        out: torch.Tensor | None = None
        total = self.views_for(name) * len(idx)
        for view in range(self.views_for(name)):
            gen = torch.Generator().manual_seed(self.seed * 7919 + view)
            for start in range(0, len(idx), self.batch_size):
                rows = idx[start:start + self.batch_size]
                x = self.normalize(torch.from_numpy(self.images[rows]).to(self.device))
                if name == "train" and self.views:
                    x = augment_batch(x, self.augment, gen)
                x = prefix(x.contiguous(memory_format=torch.channels_last))
                if out is None:
                    out = torch.empty((self.views_for(name), len(idx), *x.shape[1:]), dtype=torch.float16)
                out[view, start:start + len(rows)] = x.to("cpu", torch.float16)
                if self.progress is not None:
                    self.progress(f"features {name} (stages 0..{k - 1})", view * len(idx) + start + len(rows), total)
        return out.numpy()

    @torch.no_grad()
    def extend(self, src: np.ndarray, k0: int, k: int) -> np.ndarray:
        """Apply stages k0..k-1 to cached level-k0 features (V, N, ...) (no image is touched)."""
        self.builds += 1
        for stage in self.model.stages[k0:k]:
            stage.eval()
        example = torch.from_numpy(np.array(src[0, :2])).to(self.device).float()
        prefix = make_inference_prefix(list(self.model.stages[k0:k]), example)
        chunks = []
        for view in range(src.shape[0]):
            parts = []
            for start in range(0, src.shape[1], self.batch_size):
                x = torch.from_numpy(np.array(src[view, start:start + self.batch_size]))  # copy: memmap is read-only
                x = prefix(x.to(self.device).float().contiguous(memory_format=torch.channels_last))
                parts.append(x.to("cpu", torch.float16).contiguous())
            chunks.append(torch.cat(parts))
        return torch.stack(chunks).numpy()

    def load_or_build(self, path: Path, build: Callable[[], np.ndarray]) -> np.ndarray:
        if not path.exists():
            write_array(path, build())
        array = np.load(path, mmap_mode="r")
        if array.nbytes <= self.memory_bytes:  # small enough: hold in RAM, else stay memory-mapped
            array = np.ascontiguousarray(array)
        return array


def write_array(path: Path, array: np.ndarray) -> None:
    """Write to a temp file, then rename: readers never see a half-written cache. Two workers
    writing the same key write identical bytes, so the last rename wins harmlessly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
