"""The freezing strategies, one row each: what the strategy does and what it is capable of.

Pure data (no torch), below params in the core's layers: params takes its allowed names from
`STRATEGIES`, `FreezePlan` (freezeflow.core.train.freezing) its capabilities, and the loop, the
run, the Optuna space and the benchmarks ask a capability (`plan.updates_every_step`) instead of
comparing names. The table's order is the order in which params' errors and the README list them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str  # one line, for docs
    trains_everything: bool = False  # no stage is ever frozen (so no frozen-feature cache)
    trains_body: bool = True  # some body stage trains at some point (head: never; the guard judges every epoch)
    uses_cut: bool = False  # freeze.until says where the frozen prefix ends (checked against the backbone)
    unfreezes_over_time: bool = False  # stages thaw from the top, epoch by epoch (freeze.head_epochs, every)
    updates_every_step: bool = False  # the frozen count changes inside an epoch (FreezeOut's t_i)
    own_lr_decay: bool = False  # the body's lr decay per stage is freeze.lr_decay, not train.lr_decay
    anneals_per_stage: bool = False  # each body stage's lr cosine-anneals to 0 on its own clock (freeze.scale_lr)

    @property
    def changes_over_time(self) -> bool:
        """The frozen prefix is not the same for the whole run."""
        return self.unfreezes_over_time or self.updates_every_step


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("none", "every stage trains", trains_everything=True),
    Strategy("head", "only the head trains (linear probe)", trains_body=False),
    Strategy("until", "stages 0..until-1 frozen, the rest trains", uses_cut=True),
    Strategy("gradual", "the head alone, then one more stage from the top every few epochs (ULMFiT)",
             unfreezes_over_time=True, own_lr_decay=True),
    Strategy("freezeout", "every stage trains, stage i freezes at t_i of training (FreezeOut)",
             updates_every_step=True, anneals_per_stage=True),
)}
