"""Which backbone stages train, and at what learning rate, at each moment of training.

A model is a list of stages (stem, stage 1..N, head). Every strategy freezes a *prefix* of that
list, so the whole freezing state is one number: `frozen`, the count of leading stages frozen.
The strategies and their capabilities are the rows of `freezeflow.core.strategies.STRATEGIES`;
a `FreezePlan` answers for its strategy (`plan.updates_every_step`, `plan.trains_body`, ...).

    none       frozen = 0
    head       frozen = n - 1 (linear probe)
    until      frozen = k
    gradual    head alone for `head_epochs`, then one more stage from the top every `every` epochs
               (ULMFiT, Howard & Ruder 2018)
    freezeout  stage i trains until t_i = (t0 + (1 - t0) * i / L) ** 3 of training, its lr
               cosine-annealed to 0 by then (Brock et al. 2017, arXiv:1706.04983)

Discriminative learning rates, one rule for every strategy: the head trains at `lr`; the body
stage at depth d below the head (d = 1 for the top body stage) at

    lr * body_lr_factor * decay ** (d - 1)        decay = train.lr_decay (gradual: freeze.lr_decay)

as fastai's `slice(lr/100, lr)` and timm's layer decay do: the new head needs a large step, the
pretrained stages a small one, the lower (more generic) ones the smallest. FreezeOut with
`scale_lr` further divides stage i's rate by t_i (the paper's variant).

Frozen stages: requires_grad False, no .grad, not in the optimizer, eval mode (BatchNorm
statistics unchanged), and the engine runs them under no_grad so no backward goes through them.
With `bn: frozen` the BatchNorm layers of trainable stages stay in eval mode too (running
statistics kept, affine weights still learn), as the Keras fine-tuning guide recommends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from freezeflow.core.errors import ParamsError
from freezeflow.core.params import TrainParams
from freezeflow.core.strategies import STRATEGIES, Strategy


@dataclass(frozen=True)
class FreezePlan:
    strategy: str
    n_stages: int  # including the head
    until: int = 0
    head_epochs: int = 1
    every: int = 1
    lr_decay: float = 0.5
    t0: float = 0.8
    scale_lr: bool = False
    body_lr_factor: float = 1.0  # top body stage's lr / the head's
    body_lr_decay: float = 1.0  # per stage further down (every strategy but gradual, which uses lr_decay)

    @classmethod
    def from_params(cls, train: TrainParams, n_stages: int, file: str = "params/train.yaml") -> "FreezePlan":
        freeze = train.freeze
        if STRATEGIES[freeze.strategy].uses_cut and not 0 <= freeze.until <= n_stages - 1:
            raise ParamsError(file, "freeze.until", f"{freeze.until} is out of range for {train.backbone} "
                              f"({n_stages} stages incl. head); allowed: 0..{n_stages - 1}")
        return cls(freeze.strategy, n_stages, freeze.until, freeze.head_epochs, freeze.every,
                   freeze.lr_decay, freeze.t0, freeze.scale_lr, train.body_lr_factor, train.lr_decay)

    @property
    def head(self) -> int:
        return self.n_stages - 1

    # ---- what the strategy can do (freezeflow.core.strategies) ------------------------------------
    @property
    def capabilities(self) -> Strategy:
        return STRATEGIES[self.strategy]

    @property
    def trains_everything(self) -> bool:
        """No stage is ever frozen: nothing to cache."""
        return self.capabilities.trains_everything

    @property
    def trains_body(self) -> bool:
        """Some body stage trains at some point (not for `head`)."""
        return self.capabilities.trains_body

    @property
    def uses_cut(self) -> bool:
        return self.capabilities.uses_cut

    @property
    def unfreezes_over_time(self) -> bool:
        return self.capabilities.unfreezes_over_time

    @property
    def updates_every_step(self) -> bool:
        """The frozen count may change inside an epoch: ask `frozen_count` before every step."""
        return self.capabilities.updates_every_step

    @property
    def changes_over_time(self) -> bool:
        return self.capabilities.changes_over_time

    def fine_tune_frozen(self) -> int:
        """The frozen count once fine-tuning starts, after the head-only epochs (what the lr finder tests)."""
        return self.frozen_count(self.head_epochs, 0.0)

    def freeze_times(self) -> list[float]:
        """FreezeOut's t_i for stages 0..L-1 (fraction of training when stage i stops training)."""
        body = self.n_stages - 1
        return [(self.t0 + (1 - self.t0) * i / body) ** 3 for i in range(body)]

    def frozen_count(self, epoch: int, progress: float) -> int:
        """Leading stages frozen at `epoch` (0-based) and `progress` in [0, 1] of all steps."""
        if self.unfreezes_over_time:  # gradual
            if epoch < self.head_epochs:
                return self.head
            return max(0, self.head - 1 - (epoch - self.head_epochs) // self.every)
        if self.updates_every_step:  # freezeout: t_i increase with i
            return sum(1 for t in self.freeze_times() if progress >= t)
        if self.trains_everything:
            return 0
        return self.until if self.uses_cut else self.head

    def lr_scale(self, stage: int) -> float:
        """Static multiplier of the head's lr for `stage`: the discriminative rule in the module
        docstring (and FreezeOut's 1 / t_i with scale_lr)."""
        if stage >= self.head:
            return 1.0
        decay = self.lr_decay if self.capabilities.own_lr_decay else self.body_lr_decay
        scale = self.body_lr_factor * decay ** (self.head - stage - 1)
        if self.capabilities.anneals_per_stage and self.scale_lr:
            scale /= self.freeze_times()[stage]
        return scale

    def lr_factor(self, stage: int, progress: float, schedule_factor: float) -> float:
        """Time-varying factor: FreezeOut anneals each body stage on its own clock to 0 at t_i."""
        if self.capabilities.anneals_per_stage and stage < self.head:
            t_i = self.freeze_times()[stage]
            return 0.5 * (1 + math.cos(math.pi * min(progress / t_i, 1.0)))
        return schedule_factor


def stage_parameters(model: nn.Module, stage: int) -> list[nn.Parameter]:
    return list(model.stages[stage].parameters())


def apply_freeze(model: nn.Module, frozen: int) -> None:
    """requires_grad by stage; frozen stages lose any .grad so nothing can update them."""
    for i, stage in enumerate(model.stages):
        trainable = i >= frozen
        for p in stage.parameters():
            p.requires_grad_(trainable)
            if not trainable:
                p.grad = None


def set_train_mode(model: nn.Module, frozen: int, bn: str = "train") -> None:
    """model.train() except frozen stages stay in eval: BatchNorm running stats are kept.
    bn="frozen": the BatchNorm layers of trainable stages stay in eval as well."""
    model.train()
    for stage in model.stages[:frozen]:
        stage.eval()
    if bn == "frozen":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float,
                   plan: FreezePlan, frozen: int) -> torch.optim.Optimizer:
    """Optimizer over trainable stages only, one param group per stage, from the head down."""
    groups = [group for i in reversed(range(frozen, plan.n_stages))
              if (group := make_group(model, i, lr, plan))]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def make_group(model: nn.Module, stage: int, lr: float, plan: FreezePlan) -> dict | None:
    params = stage_parameters(model, stage)
    if not params:
        return None
    base = lr * plan.lr_scale(stage)
    return {"params": params, "stage": stage, "base_lr": base, "lr": base}


def sync_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, lr: float, plan: FreezePlan,
                   frozen: int) -> bool:
    """Drop groups of stages that froze, add groups of stages that thawed. True if anything changed.

    Groups are kept in the order stages join (head first, then downwards) so a resumed run,
    rebuilt the same way, has the same group order and its optimizer state loads one-to-one.
    """
    keep = [group for group in optimizer.param_groups if group["stage"] >= frozen]
    changed = len(keep) != len(optimizer.param_groups)
    for group in optimizer.param_groups:
        if group["stage"] < frozen:
            for p in group["params"]:
                optimizer.state.pop(p, None)
    optimizer.param_groups[:] = keep  # by identity: dict equality would compare tensors
    present = {group["stage"] for group in optimizer.param_groups}
    for i in reversed(range(frozen, plan.n_stages)):
        if i not in present and (group := make_group(model, i, lr, plan)):
            optimizer.add_param_group(group)
            changed = True
    return changed


def describe_groups(optimizer: torch.optim.Optimizer, stage_names: list[str]) -> dict[str, float]:
    """{'lr/head': 0.003, 'lr/stage6': 0.0015, ...}: what MLflow logs per epoch."""
    return {f"lr/{stage_names[g['stage']]}": float(g["lr"]) for g in optimizer.param_groups}
