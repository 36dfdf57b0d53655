"""predict: label image files with a trained model. Core only (no MLflow/Prefect).

Each file is decoded and resized exactly as `prepare` does it (core.data.preprocess.decode_pixels), then
normalized as in training by `predict_images`. A file that cannot be used gives one `{"file", "error"}` row
and never stops the others. `label_batch` is that row logic for any items and any runtime: the served model
(core.infer.serve) runs on it too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from freezeflow.core.data.folders import list_files
from freezeflow.core.errors import UserError
from freezeflow.core.data.images import is_hidden
from freezeflow.core.data.preprocess import read_pixels
from freezeflow.core.models.info import ModelInfo

if TYPE_CHECKING:  # the row logic (label_batch) serves the ONNX runtime too, which has no torch
    import torch

Probabilities = Callable[[np.ndarray], np.ndarray]  # uint8 (N, 3, S, S) -> float32 (N, classes), rows sum to 1

DEFAULT_MAX_PIXELS = 40_000_000  # the default of data.max_pixels
TOP_K = 3


def expand_paths(paths: list[Path]) -> list[Path]:
    """Files as named (even hidden ones: the user asked); folders replaced by their files.

    A folder contributes its files recursively, sorted, skipping hidden files and folders
    (.DS_Store, Thumbs.db, __MACOSX, ...) as `images.is_hidden` defines them.
    """
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            out += [f for f in list_files(path) if not is_hidden(f)]
        else:
            out.append(path)
    return out


def load_pixels(path: Path, size: int, max_pixels: int) -> np.ndarray:
    """(3, size, size) uint8 for one file; UserError (one line) when the file is unusable."""
    if not path.exists():
        raise UserError(f"cannot use image {path}: no such file")
    return read_pixels(path, size, max_pixels)


def describe_error(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return first[:300]


def rank_labels(probs: np.ndarray, classes: list[str], k: int = TOP_K) -> dict:
    """{"label", "probability", "top": [[label, p], ...]} for one row of probabilities."""
    order = np.argsort(-probs, kind="stable")[:k]
    top = [[classes[i], round(float(probs[i]), 6)] for i in order]
    return {"label": top[0][0], "probability": top[0][1], "top": top}


def label_batch(items: Sequence[Any], load: Callable[[Any], np.ndarray], probabilities: Probabilities,
                classes: list[str], k: int = TOP_K) -> list[dict]:
    """One row per item, in order: `load` each into uint8 (3, S, S) (an exception becomes {"error": one line}),
    run `probabilities` once on the stack of the good ones, and rank each ({"label", "probability", "top"})."""
    rows: list[dict] = []
    pixels, slots = [], []
    for item in items:
        try:
            pixels.append(load(item))
            slots.append(len(rows))
            rows.append({})
        except Exception as exc:  # noqa: BLE001 - one bad item (any decoder error) must not stop the batch
            rows.append({"error": describe_error(exc)})
    if pixels:
        probs = probabilities(np.stack(pixels))  # (n_good, classes)
        for slot, row in zip(slots, probs):
            rows[slot].update(rank_labels(row, classes, k))
    return rows


def torch_probabilities(model: torch.nn.Module, info: ModelInfo) -> Probabilities:
    """The PyTorch runtime: predict_images (normalize as in training, forward, softmax) on a uint8 batch."""
    import torch

    from freezeflow.core.models.io import predict_images

    return lambda pixels: predict_images(model, info, torch.from_numpy(pixels)).numpy()


def predict_batch(model: torch.nn.Module, info: ModelInfo, paths: list[Path], max_pixels: int) -> list[dict]:
    """Decode every file of one batch (errors become rows), then run the model once on the rest."""
    rows = label_batch(paths, lambda path: load_pixels(path, info.image_size, max_pixels),
                       torch_probabilities(model, info), list(info.classes))
    return [{"file": str(path), **row} for path, row in zip(paths, rows)]


def predict_files(model: torch.nn.Module, info: ModelInfo, paths: list[Path],
                  max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = 64) -> list[dict]:
    """One row per file, in order: a prediction with the top-3 labels, or a one-line error."""
    files = expand_paths(paths)
    model.eval()
    rows: list[dict] = []
    for start in range(0, len(files), batch_size):
        rows += predict_batch(model, info, files[start:start + batch_size], max_pixels)
    return rows
