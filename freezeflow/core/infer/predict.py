"""predict: label image files with a trained model. Core only (no MLflow/Prefect).

Each file is decoded and resized exactly as `prepare` does it (core.data.preprocess.resize_pixels), then
normalized as in training by `predict_images`. A file that cannot be used gives one `{"file", "error"}` row
and never stops the others.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from freezeflow.core.data.folders import list_files
from freezeflow.core.errors import UserError
from freezeflow.core.data.images import decode_rgb, is_hidden
from freezeflow.core.data.preprocess import resize_pixels
from freezeflow.core.models.io import ModelInfo, predict_images

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
    return resize_pixels(decode_rgb(path, max_pixels), size)


def describe_error(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return first[:300]


def rank_labels(probs: np.ndarray, classes: list[str], k: int = TOP_K) -> dict:
    """{"label", "probability", "top": [[label, p], ...]} for one row of probabilities."""
    order = np.argsort(-probs, kind="stable")[:k]
    top = [[classes[i], round(float(probs[i]), 6)] for i in order]
    return {"label": top[0][0], "probability": top[0][1], "top": top}


def predict_batch(model: torch.nn.Module, info: ModelInfo, paths: list[Path], max_pixels: int) -> list[dict]:
    """Decode every file of one batch (errors become rows), then run the model once on the rest."""
    rows: list[dict] = []
    pixels, slots = [], []
    for path in paths:
        try:
            pixels.append(load_pixels(path, info.image_size, max_pixels))
            slots.append(len(rows))
            rows.append({"file": str(path)})
        except Exception as exc:  # noqa: BLE001 - one bad file (any decoder error) must not stop the batch
            rows.append({"file": str(path), "error": describe_error(exc)})
    if pixels:
        probs = predict_images(model, info, torch.from_numpy(np.stack(pixels))).numpy()
        for slot, row in zip(slots, probs):
            rows[slot].update(rank_labels(row, list(info.classes)))
    return rows


def predict_files(model: torch.nn.Module, info: ModelInfo, paths: list[Path],
                  max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = 64) -> list[dict]:
    """One row per file, in order: a prediction with the top-3 labels, or a one-line error."""
    files = expand_paths(paths)
    model.eval()
    rows: list[dict] = []
    for start in range(0, len(files), batch_size):
        rows += predict_batch(model, info, files[start:start + batch_size], max_pixels)
    return rows
