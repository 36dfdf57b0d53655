"""Training callbacks: what plugs into a run (progress bars, MLflow, Optuna pruning, early stopping).

A callback subclasses `Callback` and overrides the hooks it needs; the others do nothing. A
`CallbackList` calls a hook on each of its callbacks, in order. The Trainer calls its callbacks on
rank 0 only (one report per run, freezeflow.core.train.distributed), except its `EarlyStopping`,
which runs on every rank: all ranks must keep the same best epoch and stop at the same one.

    on_train_start()                     `Trainer.run` begins (also after --resume)
    on_lr_found(result)                  train.lr=auto: the lr finder's result (run.resolve_lr)
    on_feature_progress(label, done, total)  batches of frozen features computed so far
    on_epoch_end(report)                 an epoch trained, validated and checkpointed
    on_divergence(message)               the divergence guard's verdict (freezeflow.core.train.guard)
    on_train_end(result)                 `Trainer.run` finished (all epochs, or stopped early)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator

import torch

if TYPE_CHECKING:
    from freezeflow.core.train.lr_finder import LrFindResult
    from freezeflow.core.train.state import EpochReport, TrainResult


class Callback:
    """No-op hooks: a subclass overrides the ones it needs."""

    def on_train_start(self) -> None:
        pass

    def on_lr_found(self, result: LrFindResult) -> None:
        pass

    def on_feature_progress(self, label: str, done: int, total: int) -> None:
        pass

    def on_epoch_end(self, report: EpochReport) -> None:
        pass

    def on_divergence(self, message: str) -> None:
        pass

    def on_train_end(self, result: TrainResult) -> None:
        pass


class CallbackList(Callback):
    """Callbacks called in order, each hook once per event. Anything but a Callback is refused here,
    at construction, rather than failing mid-training when its first missing hook is called."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks: list[Callback] = []
        for callback in callbacks:
            self.append(callback)

    def append(self, callback: Callback) -> None:
        if not isinstance(callback, Callback):
            raise TypeError(f"{callback!r} is not a freezeflow.core.train.callbacks.Callback; subclass it")
        self.callbacks.append(callback)

    def __iter__(self) -> Iterator[Callback]:
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def on_train_start(self) -> None:
        for callback in self.callbacks:
            callback.on_train_start()

    def on_lr_found(self, result: LrFindResult) -> None:
        for callback in self.callbacks:
            callback.on_lr_found(result)

    def on_feature_progress(self, label: str, done: int, total: int) -> None:
        for callback in self.callbacks:
            callback.on_feature_progress(label, done, total)

    def on_epoch_end(self, report: EpochReport) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(report)

    def on_divergence(self, message: str) -> None:
        for callback in self.callbacks:
            callback.on_divergence(message)

    def on_train_end(self, result: TrainResult) -> None:
        for callback in self.callbacks:
            callback.on_train_end(result)


class EarlyStopping(Callback):
    """The best epoch by val accuracy, its weights kept (on the CPU) to be restored after training;
    with `patience` > 0 (train.early_stopping) the run stops after that many epochs without a gain.

    The Trainer owns one, calls it before each epoch's checkpoint (which stores `state_dict()`, so a
    resumed run knows its best epoch) and restores the best weights through it (`restore`).
    """

    def __init__(self, model: torch.nn.Module, patience: int = 0):
        self.model, self.patience = model, patience
        self.best: dict = {"epoch": 0, "val_accuracy": -1.0, "state": None}
        self.epoch = 0  # the last epoch reported

    def on_epoch_end(self, report: EpochReport) -> None:
        self.epoch = report.epoch
        if report.val_accuracy > self.best["val_accuracy"]:
            self.best = {"epoch": report.epoch, "val_accuracy": report.val_accuracy,
                         "state": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.epoch - self.best["epoch"] >= self.patience

    def restore(self) -> None:
        """Load the best epoch's weights into the model (nothing before the first epoch)."""
        if self.best["state"] is not None:
            self.model.load_state_dict(self.best["state"])

    def state_dict(self) -> dict:
        return self.best

    def load_state_dict(self, best: dict) -> None:
        self.best = best
