"""Fused head trials: K `head`-only trainings that differ only in lr, schedule and weight decay train as
one. Each batch of cached features is read and pooled once, one (B, F) x (F, K*C) matmul gives every
member's logits, and one vectorized AdamW (or SGD) step updates the stacked (K, C, F) head weights with
each member's own lr and weight decay.

Why it equals K separate runs (tests/core/train/test_fused.py checks it against `Trainer`): every member starts
from the same head (`build_trainer` seeds its init with train.seed), sees the same batches in the same
order (the order generator is seeded per epoch by train.seed) and the same dropout mask (one draw per
step from the global generator, seeded per epoch). What differs per member is elementwise maths on its
own rows of the stack, so no member can change another's numbers.

A member ends on its own: an exception from its callbacks (an Optuna pruner's TrialPruned), a non-finite
loss, val accuracy at chance reported to a callback that raises, or early stopping. Its rows leave the
stack; the others go on. `train_fused` returns one `MemberOutcome` per member, in order.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from freezeflow.core.params import TrainParams
from freezeflow.core.train.batches import prefetch, split_batches, train_batches
from freezeflow.core.train.callbacks import Callback, CallbackList
from freezeflow.core.train.freezing import FreezePlan, set_train_mode
from freezeflow.core.train.guard import TrainingDiverged, chance_verdict, loss_verdict
from freezeflow.core.train.lr_schedules import PlateauState, lr_factor
from freezeflow.core.train.state import EpochReport, TrainResult

# what members of one fused group may differ in: per-member scalars of the update (everything else,
# batch size and seed included, decides the batches, the dropout masks or the loss and must be equal)
FREE_KEYS = ("lr", "schedule", "warmup_epochs", "step_size", "gamma", "plateau_patience", "plateau_factor",
             "weight_decay", "body_lr_factor", "lr_decay", "use_best")
VAL_BATCH = 512  # as Trainer.predict_split_logits


def fuse_key(params: TrainParams) -> str | None:
    """Trainings with equal keys can train fused; None: this one cannot (not `head`, lr=auto, bn_adapt)."""
    if params.freeze.strategy != "head" or not isinstance(params.lr, float) or params.bn_adapt:
        return None
    shared = {k: v for k, v in asdict(params).items() if k not in FREE_KEYS and k != "freeze"}
    return repr(sorted(shared.items()))


def fusable_head(head: nn.Module) -> bool:
    """A head fuses when its only parameters are its final Linear (pool, flatten, dropout before it)."""
    modules = list(head.children()) if isinstance(head, nn.Sequential) else []
    return bool(modules) and isinstance(modules[-1], nn.Linear) and \
        not any(True for m in modules[:-1] for _ in m.parameters())


@dataclass
class MemberOutcome:
    """One member's end: its result (it trained to the end or stopped early), or why it ended."""

    result: TrainResult | None = None
    error: BaseException | None = None


@dataclass
class Member:
    params: TrainParams
    callbacks: CallbackList
    plan: FreezePlan
    plateau: PlateauState = field(default_factory=PlateauState)
    history: list[EpochReport] = field(default_factory=list)
    best: tuple[int, float] = (0, -1.0)  # (epoch, val accuracy)
    divergence: str | None = None


class StackedOptimizer:
    """AdamW or nesterov SGD over stacked per-member tensors (K, ...), with per-member lr and weight decay:
    torch.optim takes one lr per param group, and K groups would be K optimizer calls per step. The
    update is torch's, formula for formula (torch.optim.AdamW / SGD defaults), so members match them."""

    def __init__(self, tensors: list[torch.Tensor], name: str, momentum: float):
        self.tensors, self.name, self.momentum = tensors, name, momentum
        self.betas, self.eps, self.steps = (0.9, 0.999), 1e-8, 0
        self.state: list[list[torch.Tensor]] = [[] for _ in tensors]  # adamw: [m, v]; sgd: [buffer]

    @torch.no_grad()
    def step(self, lrs: torch.Tensor, wds: torch.Tensor) -> None:
        """lrs, wds: (K,) on the tensors' device."""
        self.steps += 1
        for p, state in zip(self.tensors, self.state):
            shape = (-1,) + (1,) * (p.dim() - 1)
            lr, wd, g = lrs.view(shape), wds.view(shape), p.grad
            if self.name == "sgd":
                g = g + wd * p
                if not state:
                    state.append(g.clone())
                else:
                    state[0].mul_(self.momentum).add_(g)
                p.sub_(lr * (g + self.momentum * state[0]))
                continue
            b1, b2 = self.betas
            if not state:
                state += [torch.zeros_like(p), torch.zeros_like(p)]
            m, v = state
            p.mul_(1 - lr * wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(1 - b2 ** self.steps)).add_(self.eps)
            p.sub_((lr / (1 - b1 ** self.steps)) * m / denom)

    def keep(self, rows: torch.Tensor) -> None:
        """Only these members' rows go on (tensors, as new leaves, and their state)."""
        self.tensors = [p.detach()[rows].clone().requires_grad_(True) for p in self.tensors]
        self.state = [[s[rows].clone() for s in state] for state in self.state]


class FusedHeads:
    """The fused loop over a template Trainer (built for members[0]: its model, cache, data and device)."""

    def __init__(self, trainer, members: list[TrainParams], callbacks: list[list[Callback]]):
        keys = {fuse_key(p) for p in members}
        if None in keys or len(keys) != 1:
            raise ValueError("fused members must all be `head` trainings that differ only in " + ", ".join(FREE_KEYS))
        head = trainer.model.stages[-1]
        if not fusable_head(head) or trainer.amp == torch.float16 or trainer.world.enabled or trainer.cache is None:
            raise ValueError("this head, fp16 loss scaling, DDP or an uncached prefix cannot train fused")
        self.t, self.pre, linear = trainer, head[:-1], head[-1]
        self.members = [Member(p, CallbackList(c), FreezePlan.from_params(p, len(trainer.model.stages)))
                        for p, c in zip(members, callbacks)]
        self.active = list(range(len(members)))  # indices into members of those still training
        self.outcomes = [MemberOutcome() for _ in members]
        k = len(members)
        weight = linear.weight.detach().unsqueeze(0).repeat(k, 1, 1)  # (K, C, F): every member's init
        bias = linear.bias.detach().unsqueeze(0).repeat(k, 1)  # (K, C)
        self.opt = StackedOptimizer([weight.requires_grad_(True), bias.requires_grad_(True)],
                                    members[0].optimizer, members[0].momentum)
        self.p0 = members[0]
        self.wds = torch.tensor([p.weight_decay for p in members], device=trainer.device)

    # ---- per step ----------------------------------------------------------------------------
    def current_lrs(self, epoch_progress: float) -> list[float]:
        out = []
        for i in self.active:
            m = self.members[i]
            factor = lr_factor(m.params, epoch_progress, m.plateau.scale)
            progress = epoch_progress / m.params.epochs
            out.append(m.params.lr * m.plan.lr_scale(m.plan.head) * m.plan.lr_factor(m.plan.head, progress, factor))
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) features -> (B, K, C) logits of the active members: one matmul."""
        weight, bias = self.opt.tensors
        t = self.t
        with torch.autocast(t.device.type, dtype=t.amp or torch.float32, enabled=t.amp is not None):
            z = self.pre(x)  # (B, F); dropout draws one mask, as each separate run does
            out = F.linear(z, weight.flatten(0, 1), bias.flatten())
        return out.float().view(len(x), len(self.active), -1)

    def member_losses(self, logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
        """(B, K, C), (B,) -> (K,) mean cross-entropy per member."""
        target = y[:, None].expand(-1, logits.shape[1])
        return F.cross_entropy(logits.permute(0, 2, 1), target, reduction="none", label_smoothing=smoothing).mean(0)

    def clip_gradients(self, max_norm: float) -> None:
        """torch.nn.utils.clip_grad_norm_ per member, over that member's weight and bias rows."""
        weight, bias = self.opt.tensors
        norms = (weight.grad.pow(2).sum((1, 2)) + bias.grad.pow(2).sum(1)).sqrt()  # (K,)
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        weight.grad.mul_(coef.view(-1, 1, 1))
        bias.grad.mul_(coef.view(-1, 1))

    def train_epoch(self) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """One pass for every active member: (loss (K,), accuracy (K,), seconds, data-wait seconds)."""
        t, p = self.t, self.p0
        gen, aug_gen = t.epoch_generators()
        start = time.perf_counter()
        source = train_batches(t.cache, t.images, t.split, t.frozen, t.epoch)
        set_train_mode(t.model, t.frozen, p.bn)
        order = torch.randperm(len(t.split["train"]), generator=gen).numpy()[: t.steps_per_epoch * p.batch_size]
        k = len(self.active)
        loss_sum = torch.zeros(k, device=t.device)  # on the device: read once per epoch, not per step
        correct = torch.zeros(k, device=t.device)
        seen, wait, t_ready = 0, 0.0, time.perf_counter()
        wds = self.wds[self.active]
        with contextlib.closing(prefetch(source, order, p.batch_size, t.device.type == "cuda")) as stream:
            for x_cpu, chunk in stream:
                wait += time.perf_counter() - t_ready
                self.last_lrs = self.current_lrs(t.step / t.steps_per_epoch)
                lrs = torch.tensor(self.last_lrs, device=t.device)
                y = t.labels[t.split["train"][chunk]].to(t.device, non_blocking=True)
                logits = self.logits(t.prepare_input(x_cpu, source.level, aug_gen))
                losses = self.member_losses(logits, y, p.label_smoothing)
                for tensor in self.opt.tensors:
                    tensor.grad = None
                losses.sum().backward()  # member k's rows get only member k's gradient
                if p.grad_clip:
                    self.clip_gradients(p.grad_clip)
                self.opt.step(lrs, wds)
                loss_sum += losses.detach() * len(y)
                correct += (logits.argmax(2) == y[:, None]).sum(0)
                seen += len(y)
                t.step += 1
                t_ready = time.perf_counter()
        return loss_sum.cpu() / seen, correct.cpu() / seen, time.perf_counter() - start, wait

    @torch.no_grad()
    def validate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every active member on val: (loss (K,), accuracy (K,))."""
        t = self.t
        t.model.eval()
        batches = split_batches(t.cache, t.images, t.split, t.frozen, "val")
        with contextlib.closing(prefetch(batches, np.arange(len(batches.rows)), VAL_BATCH,
                                         t.device.type == "cuda")) as stream:
            out = [self.logits(t.to_layout(x_cpu.to(t.device).float())).cpu() for x_cpu, _ in stream]
        logits, y = torch.cat(out), t.labels[t.split["val"]]
        return self.member_losses(logits, y, 0.0), (logits.argmax(2) == y[:, None]).float().mean(0)

    # ---- per epoch, per member ---------------------------------------------------------------
    def end_member(self, index: int, error: BaseException | None) -> None:
        self.outcomes[index] = MemberOutcome(None if error else self.result_of(index), error)
        self.active.remove(index)

    def result_of(self, index: int) -> TrainResult:
        m = self.members[index]
        stopped = len(m.history) < m.params.epochs
        builds = self.t.cache.builds if index == 0 else 0  # what the group built, counted once
        return TrainResult(m.history, m.best[0], m.best[1], sum(r.epoch_time_s for r in m.history), stopped,
                           builds, {"divergence": m.divergence, "fused_with": len(self.members)})

    def finish_epoch(self, index: int, row: int, values: tuple, seconds: float, wait: float, lrs: list[float]) -> bool:
        """Report member `index`'s epoch (row `row` of this epoch's tensors). True: it goes on."""
        m, t = self.members[index], self.t
        loss, acc, val_loss, val_acc = (float(v[row]) for v in values)
        lr_row = {"lr/head": lrs[row]}
        try:
            if not math.isfinite(loss):
                m.divergence = loss_verdict(loss, t.epoch, lr_row, m.params.lr, m.params.body_lr_factor)
                m.callbacks.on_divergence(m.divergence)
                raise TrainingDiverged(m.divergence)
            m.plateau.update(val_loss, m.params)
            report = EpochReport(t.epoch, loss, acc, val_loss, val_acc, lr_row, seconds,
                                 t.steps_per_epoch * m.params.batch_size / seconds, wait / seconds, t.frozen, True)
            m.history.append(report)
            if val_acc > m.best[1]:
                m.best = (t.epoch, val_acc)
            m.callbacks.on_epoch_end(report)
            self.check_chance(m, val_acc, lr_row)
        except Exception as exc:  # noqa: BLE001 - a member's end (pruned, diverged, a callback's failure)
            self.end_member(index, exc)
            return False
        if m.params.early_stopping and t.epoch - m.best[0] >= m.params.early_stopping or t.epoch >= m.params.epochs:
            self.end_member(index, None)
            return False
        return True

    def check_chance(self, m: Member, val_acc: float, lrs: dict[str, float]) -> None:
        """Trainer.check_chance for a head-only run: val accuracy at chance after guard_epochs epochs."""
        chance = self.t.chance
        if m.params.guard_epochs and len(m.history) == m.params.guard_epochs and not m.divergence \
                and chance is not None and val_acc <= chance:
            m.divergence = chance_verdict(val_acc, chance, self.t.epoch, lrs, m.params.lr, m.params.body_lr_factor,
                                          None)
            m.callbacks.on_divergence(m.divergence)

    def run(self) -> list[MemberOutcome]:
        for m in self.members:
            m.callbacks.on_train_start()
        while self.active:
            loss, acc, seconds, wait = self.train_epoch()
            lrs = self.last_lrs  # the last step's, as Trainer reports its groups' lr
            val_loss, val_acc = self.validate()
            self.t.epoch += 1
            before = list(self.active)
            going = [self.finish_epoch(i, row, (loss, acc, val_loss, val_acc), seconds, wait, lrs)
                     for row, i in enumerate(before)]
            if self.active and not all(going):  # compact the stack to the members that go on
                rows = [row for row, g in enumerate(going) if g]
                self.opt.keep(torch.tensor(rows, dtype=torch.long, device=self.t.device))
        for m, outcome in zip(self.members, self.outcomes):
            if outcome.result is not None:
                m.callbacks.on_train_end(outcome.result)
        return self.outcomes


def train_fused(trainer, members: list[TrainParams], callbacks: list[list[Callback]]) -> list[MemberOutcome]:
    """Train `members` (fuse_key equal) fused over `trainer` (build_trainer for members[0]: its cache is
    warmed or built here). Returns one MemberOutcome per member."""
    trainer.cache.level(trainer.frozen)
    return FusedHeads(trainer, members, callbacks).run()
