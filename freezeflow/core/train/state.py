"""What a training run is at a moment, and what survives it: the per-epoch report, the run's result,
and the checkpoint's own parts (the params fingerprint it must match, the RNG state it restores).

`Trainer.state_dict()` (freezeflow.core.train.loop) assembles a checkpoint from these; `read_checkpoint`
loads one and refuses it when it was written with other params or data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from freezeflow.core.errors import UserError
from freezeflow.core.io import load_trusted
from freezeflow.core.params import TrainParams

CHECKPOINT_VERSION = 1


@dataclass
class EpochReport:
    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lrs: dict[str, float]
    epoch_time_s: float
    images_per_s: float
    data_wait_fraction: float
    frozen_stages: int
    from_cache: bool


@dataclass
class TrainResult:
    history: list[EpochReport]
    best_epoch: int
    best_val_accuracy: float
    train_time_s: float
    stopped_early: bool
    feature_builds: int = 0
    extra: dict = field(default_factory=dict)


def params_fingerprint(params: TrainParams, data_key: str) -> str:
    """What a checkpoint must match to be resumed (device and compile do not change the maths)."""
    d = asdict(params)
    for key in ("device", "compile", "use_best", "cache"):  # cache: the disk budget, not the maths
        d.pop(key, None)
    return hashlib.sha256(json.dumps([d, data_key], sort_keys=True).encode()).hexdigest()[:16]


def read_checkpoint(path: Path, fingerprint: str) -> dict:
    """A checkpoint's state, refused when written with other params or data."""
    state = load_trusted(path)
    if state.get("fingerprint") != fingerprint:
        raise UserError(f"{path}: checkpoint was written with other params or data; run without --resume "
                        "to start over (the old checkpoint is then replaced)")
    return state


def rng_state() -> dict:
    """torch's global RNG (dropout draws from it): saved so a resumed epoch draws the same."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def history_rows(history: list[EpochReport]) -> list[dict]:
    return [asdict(r) for r in history]


def history_from_rows(rows: list[dict]) -> list[EpochReport]:
    return [EpochReport(**r) for r in rows]
