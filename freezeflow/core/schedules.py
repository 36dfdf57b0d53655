"""The learning-rate schedules, one row each: its factor of the base lr as a pure function of
training progress, and the train keys of its own (what a sweep varies with it).

Pure math (no torch), below params in the core's layers: params takes its allowed names from
`SCHEDULES`, freezeflow.core.train.lr_schedules the factors (around a common linear warmup), and
the Optuna space (freezeflow.integrations.tune) the keys to suggest. The table's order is the
order in which params' errors and the README list them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

ONECYCLE_DIV = 25.0  # start lr = peak / 25, as torch.optim.lr_scheduler.OneCycleLR
ONECYCLE_FINAL_DIV = 1e4
ONECYCLE_PCT_UP = 0.3  # rising fraction when warmup_epochs is 0 (OneCycleLR's pct_start)


def cosine(t: float) -> float:
    """1 -> 0 over t in [0, 1]."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def onecycle(t: float, pct_up: float) -> float:
    """Leslie Smith's one-cycle: cosine up from peak/25 to peak, then cosine down to ~0."""
    start, end = 1.0 / ONECYCLE_DIV, 1.0 / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV)
    if t < pct_up:
        return start + (1.0 - start) * (1.0 - cosine(t / pct_up))
    return end + (1.0 - end) * cosine((t - pct_up) / max(1.0 - pct_up, 1e-9))


# A factor: (train params, t, span, plateau scale) -> factor of the base lr, where t is the epochs
# trained since the warmup (fractional: step-wise) and span the epochs from the warmup's end to the
# last; for a schedule with own_warmup, t and span count from the first epoch.
Factor = Callable[[Any, float, float, float], float]


@dataclass(frozen=True)
class Schedule:
    name: str
    factor: Factor
    # train keys the sweep samples with this schedule, besides epochs (conditional dimensions of
    # params/tune.yaml's space.schedule); the common linear warmup is tuned for cosine and onecycle only
    reads: tuple[str, ...] = ()
    own_warmup: bool = False  # onecycle: warmup_epochs is its rising phase, not a linear ramp before it


def onecycle_factor(p: Any, t: float, span: float, scale: float) -> float:
    warm = p.warmup_epochs
    return onecycle(t / span, warm / span if warm else ONECYCLE_PCT_UP)


SCHEDULES: dict[str, Schedule] = {s.name: s for s in (
    Schedule("constant", lambda p, t, span, scale: 1.0),
    Schedule("step", lambda p, t, span, scale: p.gamma ** math.floor(t / p.step_size), ("step_size", "gamma")),
    Schedule("cosine", lambda p, t, span, scale: cosine(t / max(span, 1e-9)), ("warmup_epochs",)),
    Schedule("onecycle", onecycle_factor, ("warmup_epochs",), own_warmup=True),
    Schedule("plateau", lambda p, t, span, scale: scale, ("plateau_patience", "plateau_factor")),
    Schedule("exponential", lambda p, t, span, scale: p.gamma ** math.floor(t), ("gamma",)),
)}
