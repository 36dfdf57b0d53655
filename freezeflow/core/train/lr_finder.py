"""The learning-rate range test (Smith 2015, arXiv:1506.01186): a good peak lr in seconds.

`find_lr(trainer, settings)` trains the trainer's *trainable part only* (the stages that fine-tune,
past any head-only epochs) for `steps` batches while the head's lr grows geometrically from `start`
to `end` (every trainable body stage follows at
its discriminative share, so the rule of `freezeflow.core.train.freezing` holds during the test too). The
inputs come from the frozen-feature cache whenever a prefix is frozen, so for `head` the whole
test is a few hundred small matrix products. The test stops early once the smoothed loss is 4x
its minimum, or not finite.

The suggestion is Smith's rule, fastai's `lr_min`: the lr where the smoothed loss is lowest, divided
by 10, i.e. an order of magnitude before the loss stops falling. (fastai's newer "valley" rule, the
middle of the longest falling stretch, was measured here too: with the smoothing lag of a
100-step test it landed in the flat start of the curve, 50-200x below the lrs that train well;
bench/README.md, "lr finder".) Use a fresh trainer: it is trained during the test, then thrown away.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from freezeflow.core.params import LrFindParams

SMOOTHING = 0.98  # exponential moving average of the loss, bias-corrected (as fastai's LRFinder)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum
BEFORE_MINIMUM = 10.0  # suggestion = (lr at the smoothed minimum) / this


@dataclass(frozen=True)
class LrFindResult:
    lrs: list[float]  # the head's lr at each step
    losses: list[float]  # raw training loss at each step
    smoothed: list[float]
    suggestion: float  # the head's suggested peak lr
    stopped_early: bool  # the loss blew up before `end`
    start: float
    end: float
    trainable_stages: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def range_lrs(start: float, end: float, steps: int) -> np.ndarray:
    """(steps,) geometric from start to end."""
    return start * (end / start) ** (np.arange(steps) / max(steps - 1, 1))


def smooth_losses(losses: list[float]) -> list[float]:
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
        out.append(avg / (1 - SMOOTHING ** (i + 1)))
    return out


def suggest_lr(lrs: list[float], smoothed: list[float]) -> float:
    """(lr at the lowest smoothed loss) / 10, never below the first lr tested: inside the tested range."""
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    if not finite:
        return float(lrs[0])
    best = min(finite, key=lambda i: smoothed[i])
    return float(max(lrs[best] / BEFORE_MINIMUM, lrs[0]))


def batches_forever(trainer, gen: torch.Generator):
    """(inputs, labels, level) batches of the trainer's epoch source, reshuffled every pass."""
    source = trainer.epoch_source()
    n = len(trainer.split["train"])
    batch = min(trainer.params.batch_size, n)
    while True:
        order = torch.randperm(n, generator=gen).numpy()
        for start in range(0, n - batch + 1, batch):
            chunk = order[start:start + batch]
            y = trainer.labels[trainer.split["train"][chunk]].to(trainer.device)
            yield trainer.prepare_input(source.take(chunk), source.level, gen), y, source.level


def find_lr(trainer, settings: LrFindParams) -> LrFindResult:
    """Run the range test on `trainer` (its model is trained in the process: pass a throwaway)."""
    from freezeflow.core.train.freezing import set_train_mode

    gen = torch.Generator().manual_seed(trainer.params.seed)
    torch.manual_seed(trainer.params.seed)
    trainer.apply_frozen(trainer.plan.fine_tune_frozen())  # the stages that fine-tune, past any head-only epochs
    set_train_mode(trainer.model, trainer.frozen, trainer.params.bn)
    schedule = range_lrs(settings.start, settings.end, settings.steps)
    lrs, losses, best, stopped = [], [], math.inf, False
    stream = batches_forever(trainer, gen)
    for lr in schedule:
        for group in trainer.optimizer.param_groups:  # base_lr = head lr x the stage's discriminative share
            group["lr"] = float(lr) * group["base_lr"] / trainer.params.lr
        x, y, level = next(stream)
        loss, _ = trainer.train_step(x, level, y)
        lrs.append(float(lr))
        losses.append(float(loss))
        smoothed = smooth_losses(losses)[-1]
        if not math.isfinite(smoothed) or smoothed > DIVERGED * best:
            stopped = True
            break
        best = min(best, smoothed)
    smoothed_all = smooth_losses(losses)
    names = [trainer.model.stage_names[g["stage"]] for g in trainer.optimizer.param_groups]
    return LrFindResult(lrs, losses, smoothed_all, suggest_lr(lrs, smoothed_all), stopped,
                        settings.start, settings.end, names)
