"""The model folder: saving and loading a trained model (a weights-only state dict plus model.json saying how
to rebuild and feed it: core.models.info), and `predict_images`, its class probabilities for prepared uint8 images.

Two weights formats, the same model.json beside each:
    model.pt      torch.save of the state dict, read with weights-only unpickling (models/, checkpoints)
    weights.npz   the state dict as plain numpy arrays, read with allow_pickle=False: the served bundle's
                  (integrations.serving), which no pickle reader ever opens
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from freezeflow.core.data.preprocess import normalize_batch
from freezeflow.core.models.info import WEIGHTS_NPZ, ModelInfo, read_info, write_info  # noqa: F401 - torch-free
from freezeflow.core.models.registry import build_backbone
from freezeflow.core.models.staged import StagedNet
from freezeflow.core.errors import UserError, first_line
from freezeflow.core.io import load_trusted, open_atomic, save_atomic


def save_model(model: StagedNet, info: ModelInfo, folder: Path) -> Path:
    """folder/model.pt (state dict, CPU tensors) + folder/model.json (how to rebuild and feed it)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomic(state, folder / "model.pt")
    write_info(info, folder)
    return folder / "model.pt"


def load_model(folder: Path) -> tuple[StagedNet, ModelInfo]:
    """Rebuild the architecture (no download) and load the weights with weights-only unpickling."""
    info = read_info(folder)
    model = build_backbone(info.backbone, weights="none", num_classes=len(info.classes))
    model.load_state_dict(load_trusted(folder / "model.pt"))
    return model.eval(), info


def save_bundle(model: StagedNet, info: ModelInfo, folder: Path) -> Path:
    """folder/weights.npz (every state-dict tensor as a CPU numpy array) + folder/model.json. Returns folder."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {key: value.detach().cpu().numpy() for key, value in model.state_dict().items()}
    with open_atomic(folder / WEIGHTS_NPZ) as handle:
        np.savez(handle, **arrays)
    write_info(info, folder)
    return folder


def load_bundle(folder: Path) -> tuple[StagedNet, ModelInfo]:
    """Rebuild the architecture (no download) and load weights.npz with allow_pickle=False: an object array
    (the only way an npz can carry a pickle) is refused with a one-line UserError."""
    info = read_info(folder)
    model = build_backbone(info.backbone, weights="none", num_classes=len(info.classes))
    try:
        with np.load(folder / WEIGHTS_NPZ, allow_pickle=False) as arrays:
            state = {key: torch.from_numpy(arrays[key]) for key in arrays.files}
    except FileNotFoundError:
        raise UserError(f"{folder / WEIGHTS_NPZ}: no such file") from None
    except (ValueError, OSError, zipfile.BadZipFile) as exc:  # object arrays need pickle: refused
        raise UserError(f"{folder / WEIGHTS_NPZ}: refused to load: not a plain weights file ({first_line(exc)})") \
            from None
    model.load_state_dict(state)
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
