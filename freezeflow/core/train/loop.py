"""The Trainer and its epoch loop: only trainable stages get gradients, frozen prefixes come from the cache.

`Trainer.run` is pure-ish: model + prepared data + params in, history out. It
writes only its checkpoint (atomically, every epoch) so that `resume=True` continues bit-exactly
on CPU. Logging, progress bars, Optuna and MLflow plug in through `callbacks`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from freezeflow.core.train import distributed, feature_store
from freezeflow.core.data.augment import augment_batch
from freezeflow.core.data.prepare import Prepared
from freezeflow.core.models.batchnorm import adapt_or_load
from freezeflow.core.io import save_atomic
from freezeflow.core.errors import UserError
from freezeflow.core.data.preprocess import normalize_batch
from freezeflow.core.train.callbacks import Callback, CallbackList, EarlyStopping
from freezeflow.core.train.batches import Batches, prefetch, split_batches, train_batches
from freezeflow.core.train.features import FeatureCache, FeatureSpec, feature_key
from freezeflow.core.train.freezing import (FreezePlan, apply_freeze, describe_groups, make_optimizer,
                                            set_train_mode, sync_optimizer)
from freezeflow.core.train.guard import TrainingDiverged, chance_threshold, chance_verdict, loss_verdict
from freezeflow.core.params import TrainParams
from freezeflow.core.train.lr_schedules import PlateauState, lr_factor
from freezeflow.core.train.state import (CHECKPOINT_VERSION, EpochReport, TrainResult, history_from_rows,
                                         history_rows, params_fingerprint, read_checkpoint, rng_state,
                                         set_rng_state)


ADAPT_BATCH = 128  # AdaBN pass: fixed, so the adapted statistics do not depend on train.batch_size
ADAPT_IMAGES = 1024  # AdaBN: statistics of 1k images are as good as of all; evenly spaced over the split


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"params/train.yaml: device: {spec!r} asked for, but no CUDA device is available; "
                        "allowed here: auto, cpu")
    return torch.device(spec)


def peak_cuda_mb() -> float | None:
    """Peak CUDA allocation of this process in MB on the device it used: the largest over the visible
    devices (training on cuda:1 allocates nothing on cuda:0, which max_memory_allocated() reads). None
    without CUDA."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20


def resolve_amp(spec: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on GPU: bf16 where supported (no loss scaling needed), else fp16."""
    if device.type != "cuda" or spec == "off":
        return None
    if spec == "fp16" or (spec == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


class Suffix(torch.nn.Module):
    """The stages from `start` on, as one module: what DistributedDataParallel wraps."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        return self.model.forward_from(x, start)


@dataclass(frozen=True)
class TrainerSpec:
    """What one Trainer trains, on what, and where it keeps things (built by run.build_trainer)."""

    model: torch.nn.Module  # a fresh head for the data's classes
    data: Prepared
    params: TrainParams
    plan: FreezePlan
    mean_std: tuple  # the backbone's input normalization
    features: FeatureSpec  # the frozen-feature cache (used only where the strategy freezes a prefix)
    checkpoint: Path | None = None  # None: a throwaway trainer (lr finder, the guard's probe) writes nothing
    # val accuracy of the head alone on the same data, asked for by the divergence guard only when val
    # accuracy sits at chance while body stages train (freezeflow.core.train.guard)
    reference: Callable[[], float] | None = None


class Trainer:
    """State of one training run; `run()` trains from the current epoch to the end.

    Under torchrun (see `freezeflow.core.train.distributed`) the same code runs on every rank: each trains on
    its slice of every global batch through DistributedDataParallel; only rank 0 writes and reports.
    """

    def __init__(self, spec: TrainerSpec, callbacks: list[Callback] | None = None):
        params, plan, data = spec.params, spec.plan, spec.data
        self.params, self.plan, self.data_key = params, plan, data.key
        self.reference, self.divergence = spec.reference, None
        self.world = distributed.current()
        distributed.check_batch_size(params.batch_size, self.world)
        self.device = resolve_device(params.device)
        self.amp = resolve_amp(params.amp, self.device)
        self.model = spec.model.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if params.channels_last:  # faster convolutions on GPU and, measured here, ~1.5x on CPU too
            self.model = self.model.to(memory_format=torch.channels_last)
        self.images, self.labels, self.split = data.images, torch.from_numpy(data.labels), data.split
        mean, std = (torch.tensor(v, device=self.device).view(1, 3, 1, 1) for v in spec.mean_std)
        self.normalize = lambda x: normalize_batch(x, mean, std)
        self.checkpoint = spec.checkpoint
        # progress bars, MLflow, Optuna run on rank 0 only: one report per run
        self.callbacks = CallbackList((callbacks or ()) if self.world.is_main else ())
        if params.bn_adapt:
            self.adapt_statistics(spec.features.root)
        self.steps_per_epoch = max(1, len(self.split["train"]) // params.batch_size)
        self.total_steps = self.steps_per_epoch * params.epochs
        self.frozen = plan.frozen_count(0, 0.0)
        apply_freeze(self.model, self.frozen)
        self.net = self.wrap_trainable()
        self.optimizer = make_optimizer(self.model, params.optimizer, params.lr, params.weight_decay,
                                        params.momentum, plan, self.frozen)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.plateau = PlateauState()
        self.epoch, self.step, self.history = 0, 0, []
        self.stopper = EarlyStopping(self.model, params.early_stopping)  # keeps the best epoch's weights
        self.chance = chance_threshold(data.labels[self.split["val"]], int(self.model.classifier.out_features))
        self.cache = FeatureCache(self.model, self.images, self.split, self.normalize, spec.features,
                                  self.world, data.digests) if self.use_cache(params) else None
        if self.cache is not None:
            self.cache.progress = self.callbacks.on_feature_progress
        self.compiled: set[int] = set()
        self.compile_trainable()

    def compile_trainable(self) -> None:
        """compile: true compiles each stage when it becomes trainable (frozen ones run once, for the cache,
        or without autograd). Every stage's forward is one code object to dynamo, so its recompile limit
        must cover a graph per stage and batch shape (train, val, val's last), not the default 8."""
        if not self.params.compile:
            return
        import torch._dynamo

        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
        setattr(config, name, max(getattr(config, name), 8 * len(self.model.stages)))
        for i in range(self.frozen, len(self.model.stages)):
            if i not in self.compiled:
                # static shapes: the train batch is fixed (the last partial batch is dropped), val adds one or
                # two more; dynamic ones fail in inductor on the TF "same" padding of EfficientNet-Lite
                self.model.stages[i].compile(dynamic=False)
                self.compiled.add(i)

    def adapt_statistics(self, root: Path | None) -> None:
        """AdaBN: the body's BatchNorm statistics from the train images (one pass, before any
        feature is cached); stored beside the feature cache, so later runs and trials load them."""
        key = feature_key(self.data_key, self.model.name, self.params.weights, 0, None, 0, 0, bn_adapt=True)
        path = root / f"{feature_store.entry_stem(self.model.name)}-adabn-{key}.pt" if root is not None else None
        rows = self.split["train"]
        rows = rows[np.linspace(0, len(rows) - 1, min(len(rows), ADAPT_IMAGES)).astype(int)]  # sorted: by class
        batches = (self.to_layout(self.normalize(torch.from_numpy(self.images[rows[i:i + ADAPT_BATCH]])
                                                 .to(self.device)))
                   for i in range(0, len(rows), ADAPT_BATCH))
        with distributed.main_first():  # rank 0 computes and stores, the others load its file
            adapt_or_load(list(self.model.stages[:-1]), batches, path)

    def wrap_trainable(self) -> torch.nn.Module:
        """The trainable suffix's forward: plain, or through DDP (which averages its gradients)."""
        suffix = Suffix(self.model)
        return distributed.wrap_ddp(suffix, self.device) if self.world.enabled else suffix

    def use_cache(self, params: TrainParams) -> bool:
        deterministic = not params.augment.enabled or params.augment_views > 0
        if params.cache_features == "on" and not deterministic:
            raise UserError("params/train.yaml: cache_features: on needs deterministic inputs: set augment_views "
                            "> 0 (cached augmented views) or augment.enabled: false")
        return params.cache_features != "off" and deterministic and not self.plan.trains_everything

    # ---- one epoch -------------------------------------------------------------------------
    def epoch_source(self) -> Batches:
        return train_batches(self.cache, self.images, self.split, self.frozen, self.epoch)

    def update_freezing(self, progress: float) -> None:
        self.apply_frozen(self.plan.frozen_count(self.epoch, progress))

    def apply_frozen(self, frozen: int) -> None:
        """Freeze the first `frozen` stages (and only them): requires_grad, optimizer groups, modes."""
        if frozen != self.frozen:
            self.frozen = frozen
            apply_freeze(self.model, frozen)
            if self.world.enabled:  # DDP registers the parameters that require grad at construction
                self.net = self.wrap_trainable()
            sync_optimizer(self.optimizer, self.model, self.params.lr, self.plan, frozen)
            set_train_mode(self.model, frozen, self.params.bn)
            self.compile_trainable()
        if self.cache is not None:
            self.cache.mark_trained(frozen)

    def set_lrs(self, progress_epochs: float) -> None:
        factor = lr_factor(self.params, progress_epochs, self.plateau.scale)
        progress = progress_epochs / self.params.epochs
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * self.plan.lr_factor(group["stage"], progress, factor)

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Frozen stages between the input's level and the trainable part run without autograd."""
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            if level < self.frozen:
                with torch.no_grad():
                    for stage in self.model.stages[level:self.frozen]:
                        x = stage(x)
            return self.net(x, max(level, self.frozen))

    def prepare_input(self, x: torch.Tensor, level: int, gen: torch.Generator) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if level > 0:
            x = x.float()  # cached fp16 features
        else:
            x = self.normalize(x)
            if self.params.augment.enabled:
                x = augment_batch(x, self.params.augment, gen)
        return self.to_layout(x)

    def to_layout(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs in the model's memory format (channels_last when asked): no conversion inside convs."""
        if self.params.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def epoch_generators(self) -> tuple[torch.Generator, torch.Generator]:
        """(order, augmentation) generators: the order is the same on every rank (global batches),
        augmentation and dropout draw per rank; rank 0 draws what a single process draws."""
        seed = self.params.seed * 1_000_003 + self.epoch
        torch.manual_seed(seed + 7919 * self.world.rank)  # dropout: same stream on resume
        gen = torch.Generator().manual_seed(seed)
        return gen, gen if self.world.is_main else torch.Generator().manual_seed(seed + 7919 * self.world.rank)

    def train_epoch(self) -> tuple[float, float, float, float]:
        """One pass over the train split. Returns (loss, accuracy, seconds, data-wait seconds)."""
        gen, aug_gen = self.epoch_generators()
        start = time.perf_counter()  # epoch time includes building/extending the feature cache
        self.update_freezing(self.step / self.total_steps)
        source = self.epoch_source()
        set_train_mode(self.model, self.frozen, self.params.bn)
        n = len(self.split["train"])
        order = torch.randperm(n, generator=gen).numpy()[: self.steps_per_epoch * self.params.batch_size]
        order = distributed.shard_order(order, self.params.batch_size, self.world)  # this rank's slices
        # on the device: a .item() per step would wait for the GPU every step; read once per epoch
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen, wait, t_ready = 0, 0.0, time.perf_counter()
        local_batch = self.params.batch_size // self.world.size
        with contextlib.closing(prefetch(source, order, local_batch, self.device.type == "cuda")) as stream:
            for x_cpu, chunk in stream:  # an exception here (OOM, pruned) stops and joins the prefetch thread
                wait += time.perf_counter() - t_ready
                if self.plan.updates_every_step:
                    self.update_freezing(self.step / self.total_steps)
                self.set_lrs(self.step / self.steps_per_epoch)
                y = self.labels[self.split["train"][chunk]].to(self.device, non_blocking=True)
                loss, hits = self.train_step(self.prepare_input(x_cpu, source.level, aug_gen), source.level, y)
                loss_sum += loss * len(y)
                correct += hits
                seen += len(y)
                self.step += 1
                t_ready = time.perf_counter()
        loss_sum, correct, seen = distributed.sum_values([loss_sum.item(), float(correct.item()), float(seen)])
        return loss_sum / seen, correct / seen, time.perf_counter() - start, wait

    def train_step(self, x: torch.Tensor, level: int, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step. Returns (loss, correct predictions) as 0-d tensors on the device (no sync)."""
        logits = self.forward(x, level)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.params.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.params.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.params.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), (logits.argmax(1) == y).sum()

    @torch.no_grad()
    def predict_split_logits(self, name: str) -> torch.Tensor:
        """Logits (N, classes) for a split, from cached features when the prefix is frozen."""
        self.model.eval()
        batches = split_batches(self.cache, self.images, self.split, self.frozen, name)
        level, out = batches.level, []
        with contextlib.closing(prefetch(batches, np.arange(len(batches.rows)), 512,
                                         self.device.type == "cuda")) as stream:
            for x_cpu, _ in stream:
                x = self.to_layout(x_cpu.to(self.device).float() if level else self.normalize(x_cpu.to(self.device)))
                with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                    out.append(self.model.forward_from(x, level).float().cpu())
        return torch.cat(out)

    def validate(self) -> tuple[float, float]:
        """Every rank scores val; rank 0's result decides (best epoch, early stopping) everywhere."""
        logits = self.predict_split_logits("val")
        y = self.labels[self.split["val"]]
        result = (F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item())
        return distributed.broadcast_object(result)

    # ---- the run -----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        stopped_early = False
        self.callbacks.on_train_start()
        if self.epoch == 0 and self.cache is not None:
            with distributed.main_first():
                if self.world.is_main:
                    self.cache.reset_run_local()
        while self.epoch < self.params.epochs:
            loss, acc, seconds, wait = self.train_epoch()
            if not math.isfinite(loss):
                self.report_divergence(loss_verdict(loss, self.epoch + 1, self.peak_lrs(), self.params.lr,
                                                    self.params.body_lr_factor))
                raise TrainingDiverged(self.divergence)
            val_loss, val_acc = self.validate()
            self.plateau.update(val_loss, self.params)
            self.epoch += 1
            report = EpochReport(self.epoch, loss, acc, val_loss, val_acc,
                                 describe_groups(self.optimizer, self.model.stage_names), seconds,
                                 self.steps_per_epoch * self.params.batch_size / seconds, wait / seconds,
                                 self.frozen, self.cache is not None and self.frozen > 0)
            self.history.append(report)
            self.stopper.on_epoch_end(report)  # every rank, before the checkpoint that stores the best epoch
            self.save_checkpoint()
            self.callbacks.on_epoch_end(report)
            self.check_chance()
            if self.stopper.should_stop:
                stopped_early = True
                break
        best = self.stopper.best
        result = TrainResult(self.history, best["epoch"], best["val_accuracy"],
                             sum(r.epoch_time_s for r in self.history), stopped_early,
                             self.cache.builds if self.cache else 0, {"divergence": self.divergence})
        self.callbacks.on_train_end(result)
        return result

    # ---- the divergence guard -------------------------------------------------------------------
    def peak_lrs(self) -> dict[str, float]:
        """Each trainable stage's peak lr (before the schedule): what the guard's message quotes."""
        return {f"lr/{self.model.stage_names[g['stage']]}": float(g["base_lr"]) for g in self.optimizer.param_groups}

    def check_chance(self) -> None:
        """After guard_epochs epochs of fine-tuning (epochs in which body stages trained; every epoch for
        `head`), val accuracy at chance is reported once (freezeflow.core.train.guard). The head alone's accuracy
        comes from this run's head-only epochs (LP-FT) when it had any, else from a short probe."""
        head = self.plan.head
        tuned = [r for r in self.history if r.frozen_stages < head] or \
            ([] if self.plan.trains_body else self.history)
        if not self.params.guard_epochs or len(tuned) != self.params.guard_epochs or self.divergence:
            return
        val = self.history[-1].val_accuracy  # now, not the best: a head-only epoch may have been better
        if self.chance is None or val > self.chance:
            return
        lrs = self.peak_lrs()
        trains_body = any(k != "lr/head" for k in lrs)
        probed = [r.val_accuracy for r in self.history if r.frozen_stages == head]
        head_alone = max(probed) if trains_body and probed else \
            self.reference() if trains_body and self.reference and not self.world.enabled else None
        self.report_divergence(chance_verdict(val, self.chance, self.epoch, lrs, self.params.lr,
                                              self.params.body_lr_factor, head_alone))

    def report_divergence(self, message: str) -> None:
        self.divergence = message
        self.callbacks.on_divergence(message)

    def restore_best(self) -> None:
        self.stopper.restore()

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "fingerprint": params_fingerprint(self.params, self.data_key),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "plateau": self.plateau.state_dict(),
            "epoch": self.epoch, "step": self.step, "frozen": self.frozen, "lr": self.params.lr,
            "trained_from": self.cache.trained_from if self.cache else None,
            # the level in memory: a trained prefix's next level grows from it (fp16), so a resume must too
            "feature_level": [self.cache.current[0], sorted(self.cache.current[1])]
            if self.cache and self.cache.current else None,
            "history": history_rows(self.history),
            "best": self.stopper.state_dict(),
            "rng": rng_state(),
        }

    def save_checkpoint(self) -> None:
        if self.checkpoint is not None and self.world.is_main:
            save_atomic(self.state_dict(), self.checkpoint)

    def load_checkpoint(self, path: Path) -> None:
        state = read_checkpoint(path, params_fingerprint(self.params, self.data_key))
        self.model.load_state_dict(state["model"])
        self.frozen = state["frozen"]
        apply_freeze(self.model, self.frozen)
        # rebuild groups exactly as they were (head first, downwards), then load their state
        self.optimizer = make_optimizer(self.model, self.params.optimizer, self.params.lr,
                                        self.params.weight_decay, self.params.momentum, self.plan, self.frozen)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.world.enabled:
            self.net = self.wrap_trainable()
        self.scaler.load_state_dict(state["scaler"])
        self.plateau.load_state_dict(state["plateau"])
        self.epoch, self.step = state["epoch"], state["step"]
        if self.cache is not None and state["trained_from"] is not None:
            self.cache.mark_trained(state["trained_from"])
        if self.cache is not None and state.get("feature_level"):  # read back from disk, as it was
            self.cache.level(state["feature_level"][0], tuple(state["feature_level"][1]))
        self.history = history_from_rows(state["history"])
        self.stopper.load_state_dict(state["best"])
        set_rng_state(state["rng"])

