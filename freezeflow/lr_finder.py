"""The learning-rate range test (Smith 2015, arXiv:1506.01186): a good peak lr in seconds.

`find_lr(trainer, settings)` trains the trainer's *trainable part only* for `steps` batches while
the head's lr grows geometrically from `start` to `end` (every trainable body stage follows at
its discriminative share, so the rule of `freezeflow.freezing` holds during the test too). The
inputs come from the frozen-feature cache whenever a prefix is frozen, so for `head` the whole
test is a few hundred small matrix products. The test stops early once the smoothed loss is 4x
its minimum, or not finite.

The suggestion is fastai's "valley": the longest stretch over which the smoothed loss keeps
falling, and the lr half-way down it: large enough to learn fast, well before the loss blows up.
Use a fresh trainer (it is trained during the test and then thrown away).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from freezeflow.params import LrFindParams

SMOOTHING = 0.98  # exponential moving average of the loss, bias-corrected (as fastai's LRFinder)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum
MIN_VALLEY = 5  # a falling stretch shorter than this is noise: fall back to (lr at the minimum) / 10


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


def longest_descent(values: list[float]) -> tuple[int, int]:
    """(first, last) index of the longest strictly decreasing subsequence of `values` (O(n^2))."""
    length = [1] * len(values)
    first = list(range(len(values)))
    for i in range(len(values)):
        for j in range(i):
            if values[i] < values[j] and length[j] + 1 > length[i]:
                length[i], first[i] = length[j] + 1, first[j]
    last = max(range(len(values)), key=lambda i: (length[i], -i))
    return first[last], last


def suggest_lr(lrs: list[float], smoothed: list[float]) -> float:
    """The valley rule (module docstring); always one of `lrs`, so inside the tested range."""
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    if not finite:
        return float(lrs[0])
    values = [smoothed[i] for i in finite]
    first, last = longest_descent(values)
    if last - first + 1 >= MIN_VALLEY:
        return float(lrs[finite[first + (last - first) // 2]])
    best = finite[int(np.argmin(values))]
    return float(max(lrs[best] / 10, lrs[0]))


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
    from freezeflow.freezing import set_train_mode

    gen = torch.Generator().manual_seed(trainer.params.seed)
    torch.manual_seed(trainer.params.seed)
    trainer.update_freezing(0.0)
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
