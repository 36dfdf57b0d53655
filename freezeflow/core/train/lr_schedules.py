"""Learning-rate schedules as pure functions of training progress.

A schedule returns a factor applied to each param group's base lr. Being a pure function of
(epoch progress, params) plus a small plateau state, it survives resume exactly and works when
param groups join or leave the optimizer (gradual unfreezing, FreezeOut).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from freezeflow.core.params import TrainParams

ONECYCLE_DIV = 25.0  # start lr = peak / 25, as torch.optim.lr_scheduler.OneCycleLR
ONECYCLE_FINAL_DIV = 1e4


def cosine(t: float) -> float:
    """1 -> 0 over t in [0, 1]."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def lr_factor(params: TrainParams, epoch_progress: float, plateau_scale: float = 1.0) -> float:
    """Factor of the base lr at `epoch_progress` epochs into training (fractional: step-wise)."""
    total, warm, e = float(params.epochs), params.warmup_epochs, epoch_progress
    if params.schedule == "onecycle":
        return onecycle(e / total, warm / total if warm else 0.3)
    if warm and e < warm:
        return max(e / warm, 1e-3)  # linear warmup; never exactly 0 so Adam's first step moves
    if params.schedule == "constant":
        return 1.0
    if params.schedule == "step":
        return params.gamma ** math.floor((e - warm) / params.step_size)
    if params.schedule == "exponential":
        return params.gamma ** math.floor(e - warm)
    if params.schedule == "cosine":
        return cosine((e - warm) / max(total - warm, 1e-9))
    if params.schedule == "plateau":
        return plateau_scale
    raise ValueError(params.schedule)


def onecycle(t: float, pct_up: float) -> float:
    """Leslie Smith's one-cycle: cosine up from peak/25 to peak, then cosine down to ~0."""
    start, end = 1.0 / ONECYCLE_DIV, 1.0 / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV)
    if t < pct_up:
        return start + (1.0 - start) * (1.0 - cosine(t / pct_up))
    return end + (1.0 - end) * cosine((t - pct_up) / max(1.0 - pct_up, 1e-9))


@dataclass
class PlateauState:
    """ReduceLROnPlateau on val loss: scale *= factor after `patience` epochs without improvement."""

    best: float = math.inf
    bad_epochs: int = 0
    scale: float = 1.0

    def update(self, val_loss: float, params: TrainParams) -> None:
        if val_loss < self.best - 1e-4:
            self.best, self.bad_epochs = val_loss, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > params.plateau_patience:
            self.scale *= params.plateau_factor
            self.bad_epochs = 0

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs, self.scale = state["best"], state["bad_epochs"], state["scale"]
