"""model.json: how to rebuild and feed a trained model (backbone, classes, image size, normalization).

Torch-free, so that a runtime that serves the ONNX file (integrations.onnx_runtime) reads it without torch;
core.models.io writes it beside the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from freezeflow.core.errors import UserError
from freezeflow.core.io import write_json_atomic

WEIGHTS_NPZ = "weights.npz"  # the served bundle's weights beside model.json (core.models.io.save_bundle)


@dataclass(frozen=True)
class ModelInfo:
    backbone: str
    classes: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    data_hash: str = ""


def write_info(info: ModelInfo, folder: Path) -> Path:
    """folder/model.json: backbone, classes, image_size, mean, std, data_hash."""
    meta = {"backbone": info.backbone, "classes": info.classes, "image_size": info.image_size,
            "mean": list(info.mean), "std": list(info.std), "data_hash": info.data_hash}
    write_json_atomic(folder / "model.json", meta)
    return folder / "model.json"


def read_info(folder: Path) -> ModelInfo:
    """folder/model.json as a ModelInfo; UserError when there is none."""
    meta_path = folder / "model.json"
    if not meta_path.exists():
        raise UserError(f"{folder}: no trained model here (model.json missing); run `freezeflow train` first")
    meta = json.loads(meta_path.read_text())
    return ModelInfo(meta["backbone"], meta["classes"], meta["image_size"], tuple(meta["mean"]),
                     tuple(meta["std"]), meta.get("data_hash", ""))
