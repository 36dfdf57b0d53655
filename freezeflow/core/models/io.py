"""The model folder: saving and loading a trained model (a weights-only state dict plus model.json saying how
to rebuild and feed it), and `predict_images`, its class probabilities for prepared uint8 images."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from freezeflow.core.data.preprocess import normalize_batch
from freezeflow.core.models.registry import build_backbone
from freezeflow.core.models.staged import StagedNet
from freezeflow.core.errors import UserError
from freezeflow.core.io import load_trusted, save_atomic, write_json_atomic


@dataclass(frozen=True)
class ModelInfo:
    backbone: str
    classes: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    data_hash: str = ""


def save_model(model: StagedNet, info: ModelInfo, folder: Path) -> Path:
    """folder/model.pt (state dict, CPU tensors) + folder/model.json (how to rebuild and feed it)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomic(state, folder / "model.pt")
    meta = {"backbone": info.backbone, "classes": info.classes, "image_size": info.image_size,
            "mean": list(info.mean), "std": list(info.std), "data_hash": info.data_hash}
    write_json_atomic(folder / "model.json", meta)
    return folder / "model.pt"


def load_model(folder: Path) -> tuple[StagedNet, ModelInfo]:
    """Rebuild the architecture (no download) and load the weights with weights-only unpickling."""
    meta_path = folder / "model.json"
    if not meta_path.exists():
        raise UserError(f"{folder}: no trained model here (model.json missing); run `freezeflow train` first")
    meta = json.loads(meta_path.read_text())
    info = ModelInfo(meta["backbone"], meta["classes"], meta["image_size"], tuple(meta["mean"]),
                     tuple(meta["std"]), meta.get("data_hash", ""))
    model = build_backbone(info.backbone, weights="none", num_classes=len(info.classes))
    model.load_state_dict(load_trusted(folder / "model.pt"))
    return model.eval(), info


@torch.no_grad()
def predict_images(model: StagedNet, info: ModelInfo, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> probabilities (N, classes), normalized by core.data.preprocess like training."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize_batch(images[start:start + batch_size].to(device), info.mean, info.std)
        out.append(torch.softmax(model(x), dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, len(info.classes))
