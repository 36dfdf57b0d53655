"""Where a training or scoring pass gets its inputs: raw uint8 images (level 0) or the frozen
prefix's cached features (level k, freezeflow.core.train.features), gathered batch by batch in a
background thread while the current batch trains.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from freezeflow.core.train.features import FeatureCache


@dataclass
class Batches:
    """Where one epoch's inputs come from: raw images (level 0) or cached features (level k)."""

    arrays: Any  # np.ndarray (N, ...) uint8 images, or (V, N, ...) fp16 features
    rows: np.ndarray  # indices into arrays (dim 0 for images, dim 1 for features)
    level: int
    view: int = 0

    def take(self, positions: np.ndarray) -> torch.Tensor:
        rows = self.rows[positions]
        block = self.arrays[rows] if self.level == 0 else self.arrays[self.view][rows]
        return torch.from_numpy(np.ascontiguousarray(block))


def prefetch(batches: Batches, order: np.ndarray, batch_size: int, pin: bool) -> Iterator[torch.Tensor]:
    """Gather the next batch in a thread while the current one trains (numpy releases the GIL).

    Close the generator (contextlib.closing) when the consumer may stop early (an OOM, a pruned trial):
    the thread then stops at its next batch and is joined, rather than waiting forever on a full queue
    with a pinned batch in hand. An error in the thread is raised in the consumer."""
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for chunk in chunks:
                x = batches.take(chunk)
                if not put((x.pin_memory() if pin else x, chunk)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(exc)
            return
        put(None)

    thread = threading.Thread(target=work, daemon=True, name="freezeflow-prefetch")
    thread.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def train_batches(cache: FeatureCache | None, images: np.ndarray, split: dict[str, np.ndarray], frozen: int,
                  epoch: int) -> Batches:
    """The train split at the frozen prefix's level when it is cached (views cycled by epoch), else images."""
    if cache is not None and frozen > 0:
        feats = cache.level(frozen)
        view = epoch % feats["train"].shape[0]
        return Batches(feats["train"], np.arange(len(split["train"])), frozen, view)
    return Batches(images, split["train"], 0)


def split_batches(cache: FeatureCache | None, images: np.ndarray, split: dict[str, np.ndarray], frozen: int,
                  name: str) -> Batches:
    """Split `name` for scoring: cached features of the frozen prefix when there are any, else images."""
    level = frozen if cache is not None and frozen > 0 else 0
    if level:
        return Batches(cache.level(level, (name,))[name], np.arange(len(split[name])), level)
    return Batches(images, split[name], 0)
