"""costs: what a training configuration will cost on this machine, predicted before it runs.

    calibrate(model, image_size, batch_size)   seconds per FLOP of this machine: the whole net once forward
                                               (eval, no_grad) and once forward + backward + an SGD step
                                               (train mode), on a random batch, best of a few repeats
    predict_cost(flops, cut, ...)              TrialCost: the frozen prefix's feature build (once per cut
                                               level: the feature cache shares it across trials) and each
                                               epoch's training (stages from the cut up, plus a fixed cost
                                               per step, which batch size changes) and val scoring
A stage's cost is its FLOPs (core.models.staged.count_stage_flops, per image) times the calibrated
seconds per FLOP. The figure is an estimate: stages differ in how many FLOPs a second they reach
(depthwise convolutions fewer), and a pruned trial stops early, so a sweep's prediction is its upper
bound. Measured sweeps log predicted against measured (integrations.tune), which keeps it honest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from freezeflow.core.models.staged import StagedNet

CALIBRATION_REPEATS = 3  # the best of these (the first pays for allocation and thread start-up)


@dataclass(frozen=True)
class Calibration:
    """This machine's speed for one backbone at one image size: seconds per FLOP."""

    forward_s_per_flop: float  # inference: eval mode, no autograd
    train_s_per_flop: float  # forward + backward + optimizer step of trainable stages
    step_s: float  # what a training step costs whatever its FLOPs: zero_grad, loss, backward, AdamW step
    seconds: float  # what the calibration itself took

    def to_dict(self) -> dict:
        return {"forward_s_per_flop": self.forward_s_per_flop, "train_s_per_flop": self.train_s_per_flop,
                "step_s": self.step_s, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class TrialCost:
    """Predicted seconds of one training: `feature_build_s` is paid once per cut level and sweep."""

    cut: int  # stages 0..cut-1 frozen (their features cached); 0: everything trains
    batch_size: int
    feature_build_s: float
    epoch_s: float
    epochs: int
    fixed_s: float = 0.0  # a trial's cost outside its training loop (run tracking, building the trainer)

    @property
    def train_s(self) -> float:
        return self.epoch_s * self.epochs

    @property
    def trial_s(self) -> float:
        return self.train_s + self.fixed_s

    def to_dict(self) -> dict:
        return {"cut": self.cut, "batch_size": self.batch_size, "feature_build_s": round(self.feature_build_s, 3),
                "epoch_s": round(self.epoch_s, 3), "train_s": round(self.train_s, 3), "fixed_s": round(self.fixed_s, 3),
                "trial_s": round(self.trial_s, 3)}


def best_time(step, repeats: int = CALIBRATION_REPEATS) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times)


def calibrate(model: StagedNet, flops: list[int], image_size: int, batch_size: int = 8) -> Calibration:
    """Time the whole net forward and forward + backward on a (batch_size, 3, S, S) random batch."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)  # (B, 3, S, S)
    total = max(1, sum(flops)) * batch_size
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            forward = best_time(lambda: model(x))
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay as they were

        def train_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model(x).float().logsumexp(1).mean().backward()
            optimizer.step()

        train = best_time(train_step)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return Calibration(forward / total, train / total, step_overhead(), time.perf_counter() - started)


def step_overhead(steps: int = 20) -> float:
    """Seconds of one AdamW step of a tiny linear layer on 8 rows: the per-step cost FLOPs do not count
    (what dominates a head trained on cached features)."""
    layer = torch.nn.Linear(64, 10)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.0)
    x, y = torch.randn(8, 64), torch.zeros(8, dtype=torch.long)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(layer(x), y).backward()
        optimizer.step()

    step()  # AdamW's state is created on the first step
    return best_time(lambda: [step() for _ in range(steps)]) / steps


def predict_cost(flops: list[int], cut: int, batch_size: int, n_train: int, n_val: int, epochs: int,
                 calibration: Calibration, fixed_s: float = 0.0) -> TrialCost:
    """One training with stages 0..cut-1 frozen and cached: build their features for train + val once,
    then per epoch train the stages from `cut` up on n_train images and score n_val; plus `fixed_s`."""
    prefix, rest = sum(flops[:cut]), sum(flops[cut:])
    build = (n_train + n_val) * prefix * calibration.forward_s_per_flop if cut else 0.0
    steps = -(-n_train // batch_size)
    epoch = (n_train * rest * calibration.train_s_per_flop + n_val * rest * calibration.forward_s_per_flop
             + steps * calibration.step_s)
    return TrialCost(cut, batch_size, build, epoch, epochs, fixed_s)


def predict_sweep(costs: list[TrialCost], n_trials: int) -> dict:
    """A sweep of n_trials drawn evenly from `costs`' configurations: every trial's training, plus one
    feature build per cut level (the cache shares it). An upper bound: pruned trials stop early."""
    if not costs:
        return {"trials": n_trials, "train_s": 0.0, "feature_build_s": 0.0, "total_s": 0.0}
    train = n_trials * sum(c.trial_s for c in costs) / len(costs)
    builds = sum({c.cut: c.feature_build_s for c in costs}.values())
    return {"trials": n_trials, "train_s": round(train, 2), "feature_build_s": round(builds, 2),
            "total_s": round(train + builds, 2)}
