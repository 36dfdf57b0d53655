"""Frozen-feature cache: a frozen prefix gives the same output every epoch, so compute it once.

`FeatureCache.level(k)` returns the output of stages 0..k-1 for every image of each split, as
fp16 numpy arrays (in RAM, or memory-mapped past the memory budget): (V, N, C, H, W) for train (V augmented views, cycled by epoch) and (1, N, ...) for val and
test. Features of a *pretrained* prefix are stored on disk under a key (data, backbone, weights,
k, preprocessing, views) and reused across epochs, runs and sweep trials. Features of a prefix
this run has trained (FreezeOut) live only as long as the run, extended stage by stage.
"""

from __future__ import annotations

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

FEATURE_VERSION = 1


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
        self.run_root = run_root  # where run-local (trained-prefix) levels live, for an exact resume
        self.current: tuple[int, dict[str, np.ndarray]] | None = None
        self.trained_from: int | None = None  # lowest stage index this run has trained
        self.builds = 0  # how many levels were computed (not loaded): for tests and reports

    def mark_trained(self, lowest_trainable: int) -> None:
        """Stages >= lowest_trainable have been trained in this run: their outputs are run-local."""
        if self.trained_from is None or lowest_trainable < self.trained_from:
            self.trained_from = lowest_trainable

    def level(self, k: int) -> dict[str, np.ndarray]:
        """Features after stages 0..k-1, per split."""
        if self.current and self.current[0] == k:
            return self.current[1]
        pretrained = self.trained_from is None or k <= self.trained_from
        if pretrained and self.root is not None:
            feats = self.load_or_build(self.root / self.key_fn(k), lambda: self.compute_all(k))
        elif pretrained:
            feats = self.compute_all(k)
        else:  # a prefix this run trained (FreezeOut): grow the cached level, keep it with the checkpoint
            feats = self.load_or_build(self.run_root / f"L{k}", lambda: self.grow(k)) if self.run_root \
                else self.grow(k)
        self.current = (k, feats)
        return feats

    def compute_all(self, k: int) -> dict[str, np.ndarray]:
        return {name: self.compute(name, k) for name in self.split}

    def grow(self, k: int) -> dict[str, np.ndarray]:
        if self.current and self.current[0] < k:
            return self.extend(self.current[1], self.current[0], k)
        return self.compute_all(k)

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
        out: torch.Tensor | None = None
        for view in range(self.views_for(name)):
            gen = torch.Generator().manual_seed(self.seed * 7919 + view)
            for start in range(0, len(idx), self.batch_size):
                rows = idx[start:start + self.batch_size]
                x = self.normalize(torch.from_numpy(self.images[rows]).to(self.device))
                if name == "train" and self.views:
                    x = augment_batch(x, self.augment, gen)
                for stage in self.model.stages[:k]:
                    x = stage(x)
                if out is None:
                    out = torch.empty((self.views_for(name), len(idx), *x.shape[1:]), dtype=torch.float16)
                out[view, start:start + len(rows)] = x.to("cpu", torch.float16)
        return out.numpy()

    @torch.no_grad()
    def extend(self, feats: dict[str, np.ndarray], k0: int, k: int) -> dict[str, np.ndarray]:
        """Apply stages k0..k-1 to cached level-k0 features (no image is touched)."""
        self.builds += 1
        for stage in self.model.stages[k0:k]:
            stage.eval()
        out = {}
        for name, src in feats.items():
            chunks = []
            for view in range(src.shape[0]):
                parts = []
                for start in range(0, src.shape[1], self.batch_size):
                    x = torch.from_numpy(np.array(src[view, start:start + self.batch_size]))  # copy: memmap is read-only
                    x = x.to(self.device).float()
                    for stage in self.model.stages[k0:k]:
                        x = stage(x)
                    parts.append(x.to("cpu", torch.float16))
                chunks.append(torch.cat(parts))
            out[name] = torch.stack(chunks).numpy()
        return out

    def load_or_build(self, folder: Path, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        if not (folder / "done").exists():
            self.write(folder, build())
        feats = {}
        for name in self.split:
            array = np.load(folder / f"{name}.npy", mmap_mode="r")
            if array.nbytes <= self.memory_bytes:  # small enough: hold in RAM, else stay memory-mapped
                array = np.ascontiguousarray(array)
            feats[name] = array
        return feats

    def write(self, folder: Path, feats: dict[str, np.ndarray]) -> None:
        """Write to a temp folder, then rename: readers never see a half-written cache."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        try:
            for name, tensor in feats.items():
                np.save(tmp / f"{name}.npy", tensor)
            (tmp / "done").write_text("ok")
            try:
                os.replace(tmp, folder)
            except OSError:  # another worker wrote the same key first: theirs is identical
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
