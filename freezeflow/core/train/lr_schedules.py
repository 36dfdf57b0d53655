"""Learning-rate schedules as pure functions of training progress.

A schedule returns a factor applied to each param group's base lr. Being a pure function of
(epoch progress, params) plus a small plateau state, it survives resume exactly and works when
param groups join or leave the optimizer (gradual unfreezing, FreezeOut). The schedules themselves
are the rows of `freezeflow.core.schedules.SCHEDULES`; here: the common warmup and the plateau state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from freezeflow.core.params import TrainParams
from freezeflow.core.schedules import SCHEDULES


def lr_factor(params: TrainParams, epoch_progress: float, plateau_scale: float = 1.0) -> float:
    """Factor of the base lr at `epoch_progress` epochs into training (fractional: step-wise)."""
    schedule = SCHEDULES[params.schedule]
    total, warm, e = float(params.epochs), params.warmup_epochs, epoch_progress
    if schedule.own_warmup:
        return schedule.factor(params, e, total, plateau_scale)
    if warm and e < warm:
        return max(e / warm, 1e-3)  # linear warmup; never exactly 0 so Adam's first step moves
    return schedule.factor(params, e - warm, total - warm, plateau_scale)


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
