"""Callbacks: the base hooks do nothing, a CallbackList calls each override once per event in order,
and EarlyStopping keeps the best epoch's weights and stops after `patience` epochs without a gain."""

from __future__ import annotations

import pytest
import torch

from freezeflow.core.train.callbacks import Callback, CallbackList, EarlyStopping
from freezeflow.core.train.state import EpochReport, TrainResult

HOOKS = ("on_train_start", "on_lr_found", "on_feature_progress", "on_epoch_end", "on_divergence", "on_train_end")


def report(epoch: int, val_accuracy: float) -> EpochReport:
    return EpochReport(epoch, 0.5, 0.8, 0.6, val_accuracy, {"lr/head": 0.01}, 1.0, 100.0, 0.1, 5, True)


def fire_every_event(callbacks: Callback) -> None:
    """Each hook once, in a run's order."""
    callbacks.on_train_start()
    callbacks.on_lr_found("lr-result")
    callbacks.on_feature_progress("features train", 1, 2)
    callbacks.on_epoch_end(report(1, 0.5))
    callbacks.on_divergence("val accuracy is at chance")
    callbacks.on_train_end(TrainResult([report(1, 0.5)], 1, 0.5, 1.0, False))


class Recorder(Callback):
    """Overrides every hook: appends (its name, the hook) to a log shared by all recorders."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def on_train_start(self):
        self.log.append((self.name, "on_train_start"))

    def on_lr_found(self, result):
        self.log.append((self.name, "on_lr_found"))

    def on_feature_progress(self, label, done, total):
        self.log.append((self.name, "on_feature_progress"))

    def on_epoch_end(self, report):
        self.log.append((self.name, "on_epoch_end"))

    def on_divergence(self, message):
        self.log.append((self.name, "on_divergence"))

    def on_train_end(self, result):
        self.log.append((self.name, "on_train_end"))


class OnlyEpochs(Callback):
    """Overrides one hook: the others are the base class's no-ops."""

    def __init__(self):
        self.epochs: list[int] = []

    def on_epoch_end(self, report):
        self.epochs.append(report.epoch)


def test_the_base_hooks_are_no_ops():
    base = Callback()
    fire_every_event(base)  # nothing raised, nothing returned
    assert all(getattr(base, hook)(*args) is None for hook, args in
               zip(HOOKS, [(), ("r",), ("x", 1, 2), (report(1, 0.5),), ("m",), (None,)]))
    assert vars(base) == {}


def test_a_callback_list_calls_each_override_once_per_event_in_order():
    log: list = []
    only = OnlyEpochs()
    callbacks = CallbackList([Recorder("a", log), only, Recorder("b", log)])
    fire_every_event(callbacks)
    assert log == [(name, hook) for hook in HOOKS for name in ("a", "b")]
    assert only.epochs == [1]
    late = Recorder("c", log)
    callbacks.append(late)  # added after construction (a test's inspector): called from then on
    log.clear()
    callbacks.on_epoch_end(report(2, 0.6))
    assert log == [("a", "on_epoch_end"), ("b", "on_epoch_end"), ("c", "on_epoch_end")] and only.epochs == [1, 2]
    assert list(callbacks)[-1] is late and len(callbacks) == 4


def test_anything_but_a_callback_is_refused_up_front():
    class DuckTyped:
        def on_epoch_end(self, report):
            pass

    with pytest.raises(TypeError, match="not a freezeflow.core.train.callbacks.Callback"):
        CallbackList([DuckTyped()])


def test_early_stopping_keeps_the_best_weights_and_stops_after_patience():
    model = torch.nn.Linear(2, 2)
    stopper = EarlyStopping(model, patience=2)
    weights = []
    for epoch, acc in enumerate([0.5, 0.7, 0.6, 0.65], start=1):
        with torch.no_grad():
            model.weight.fill_(float(epoch))  # "training" changes the weights every epoch
        weights.append(model.weight.clone())
        stopper.on_epoch_end(report(epoch, acc))
        assert stopper.should_stop == (epoch == 4), epoch  # 2 epochs after the best (epoch 2)
    assert stopper.best["epoch"] == 2 and stopper.best["val_accuracy"] == 0.7
    stopper.restore()
    assert torch.equal(model.weight, weights[1])
    resumed = EarlyStopping(model, patience=2)
    resumed.load_state_dict(stopper.state_dict())  # what a checkpoint carries
    assert resumed.best["epoch"] == 2 and not resumed.should_stop


def test_without_patience_the_best_epoch_is_kept_but_nothing_stops():
    model = torch.nn.Linear(2, 2)
    stopper = EarlyStopping(model, patience=0)
    for epoch in range(1, 6):
        stopper.on_epoch_end(report(epoch, 0.9 if epoch == 1 else 0.1))
        assert not stopper.should_stop
    assert stopper.best["epoch"] == 1
    EarlyStopping(model).restore()  # before any epoch: nothing to restore, nothing changes
