"""evaluate: score a saved model on one split of the prepared data. Core only (no MLflow/Prefect).

The model is rebuilt from `models/` (model.json + weights-only model.pt) and fed the same uint8
arrays training used, so the numbers match what `run_training` reported for that split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from freezeflow.core.errors import UserError
from freezeflow.core.metrics import summarize_predictions
from freezeflow.core.models.io import ModelInfo, load_model, predict_images
from freezeflow.core.data.prepare import Prepared
from freezeflow.core.io import write_json_atomic


def check_compatible(info: ModelInfo, prepared: Prepared, model_dir: Path) -> None:
    """The model must have been trained on images of this size with these classes, in this order."""
    where = Path(model_dir) / "model.json"
    if info.image_size != prepared.image_size:
        raise UserError(f"{where}: model expects image_size {info.image_size} but the prepared data has "
                        f"{prepared.image_size}; allowed: data.image_size={info.image_size}")
    if list(info.classes) != list(prepared.classes):
        raise UserError(f"{where}: model classes {list(info.classes)} differ from the dataset's "
                        f"{list(prepared.classes)}; allowed: the dataset the model was trained on")


def predict_split_probabilities(model: torch.nn.Module, info: ModelInfo, prepared: Prepared, split: str,
                                batch_size: int = 256) -> np.ndarray:
    """Probabilities (n, classes) for the rows of `split`, read from the memory map in chunks."""
    if split not in prepared.split:
        raise UserError(f"params/evaluate.yaml: split: {split!r} is not allowed; allowed: "
                        f"{', '.join(sorted(prepared.split))}")
    rows = prepared.split[split]
    out = []
    for start in range(0, len(rows), batch_size):
        block = np.ascontiguousarray(prepared.images[rows[start:start + batch_size]])
        out.append(predict_images(model, info, torch.from_numpy(block), batch_size).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(info.classes)), dtype=np.float32)


def evaluate_loaded(model: torch.nn.Module, info: ModelInfo, prepared: Prepared, split: str = "test",
                    batch_size: int = 256) -> dict:
    """accuracy, macro_f1, per_class, confusion_matrix, split, n for an in-memory model."""
    probs = predict_split_probabilities(model, info, prepared, split, batch_size)
    y_true = prepared.labels[prepared.split[split]]
    report = summarize_predictions(y_true, probs.argmax(1), list(prepared.classes))
    return report | {"split": split, "n": int(len(y_true)), "data_hash": prepared.data_hash,
                     "model_data_hash": info.data_hash, "backbone": info.backbone}


def evaluate_model(model_dir: Path | tuple[torch.nn.Module, ModelInfo], prepared: Prepared, split: str = "test",
                   batch_size: int = 256) -> dict:
    """Score the model saved in `model_dir` (or an already loaded `(model, info)`) on `split`."""
    if isinstance(model_dir, tuple):
        (model, info), where = model_dir, Path("<loaded model>")
    else:
        (model, info), where = load_model(Path(model_dir)), Path(model_dir)
    check_compatible(info, prepared, where)
    return evaluate_loaded(model, info, prepared, split, batch_size)


def write_eval(report: dict, path: Path) -> None:
    """Write the evaluation report as JSON, atomically (readers never see half a file)."""
    write_json_atomic(Path(path), report)
