"""Fused head trials equal separate ones: K `head` trainings over the cached features of a real photo
folder (pretrained EfficientNet-Lite0), each with its own lr, schedule and weight decay, train as one
stack and give the same per-epoch metrics and head weights as K `Trainer` runs; a member that a callback
ends leaves the others' numbers unchanged."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from freezeflow.core.data.prepare import prepare_dataset
from freezeflow.core.layout import Layout
from freezeflow.core.params import load_params
from freezeflow.core.train.callbacks import Callback
from freezeflow.core.train.fused import FusedHeads, fuse_key, train_fused
from freezeflow.core.train.run import build_trainer

PARAMS = Path(__file__).parents[3] / "params"
# each member differs from the first only in what a sweep varies for `head`
MEMBERS = [{"train.lr": 0.01, "train.schedule": "cosine", "train.warmup_epochs": 0.5},
           {"train.lr": 0.003, "train.schedule": "step", "train.step_size": 1, "train.gamma": 0.5,
            "train.weight_decay": 0.01},
           {"train.lr": 0.03, "train.schedule": "plateau", "train.plateau_patience": 0,
            "train.plateau_factor": 0.3}]


class Stop(Exception):
    pass


class StopAfter(Callback):
    """Ends a member after `epoch` epochs, as an Optuna pruner's TrialPruned would."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, report) -> None:
        if report.epoch == self.epoch:
            raise Stop(f"stopped after epoch {report.epoch}")


class Keep(Callback):
    def __init__(self):
        self.reports = []

    def on_epoch_end(self, report) -> None:
        self.reports.append(report)


@pytest.fixture(scope="module")
def setup(photo_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    base = [f"data.dir={photo_folder('textures', 10)}", "data.image_size=32", "train.epochs=3",
            "train.batch_size=16"]
    params = [load_params(PARAMS, base + [f"{k}={v}" for k, v in m.items()]) for m in MEMBERS]
    prepared = prepare_dataset(params[0].data, root / "prepared")
    return params, prepared, Layout(root)


def separate(params, prepared, layout, optimizer: str):
    p = replace(params, train=replace(params.train, optimizer=optimizer))
    keep = Keep()
    trainer = build_trainer(p, prepared, layout, [keep], checkpoint=False)
    result = trainer.run()
    return result, keep.reports, trainer.model.classifier


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fused_members_equal_separate_trainer_runs(setup, optimizer):
    params, prepared, layout = setup
    trains = [replace(p.train, optimizer=optimizer) for p in params]
    assert len({fuse_key(t) for t in trains}) == 1
    template = build_trainer(replace(params[0], train=trains[0]), prepared, layout, [], checkpoint=False)
    keeps = [Keep() for _ in trains]
    fused = FusedHeads(template, trains, [[k] for k in keeps])
    template.cache.level(template.frozen)
    outcomes = fused.run()
    weight, bias = fused.opt.tensors
    for i, (p, outcome, keep) in enumerate(zip(params, outcomes, keeps)):
        result, reports, linear = separate(p, prepared, layout, optimizer)
        assert outcome.error is None and outcome.result.best_epoch == result.best_epoch
        assert outcome.result.best_val_accuracy == pytest.approx(result.best_val_accuracy, abs=1e-6)
        for mine, theirs in zip(keep.reports, reports, strict=True):
            assert mine.train_loss == pytest.approx(theirs.train_loss, rel=1e-4)
            assert mine.val_loss == pytest.approx(theirs.val_loss, rel=1e-4)
            assert mine.val_accuracy == pytest.approx(theirs.val_accuracy, abs=1e-6)
            assert mine.lrs["lr/head"] == pytest.approx(theirs.lrs["lr/head"], rel=1e-6)
        torch.testing.assert_close(weight[i].detach(), linear.weight.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bias[i].detach(), linear.bias.detach(), rtol=1e-4, atol=1e-5)


def test_a_member_ended_by_its_callback_leaves_the_others_unchanged(setup):
    params, prepared, layout = setup
    trains = [p.train for p in params]
    template = build_trainer(params[0], prepared, layout, [], checkpoint=False)
    keeps = [Keep() for _ in trains]
    callbacks = [[keeps[0]], [keeps[1], StopAfter(1)], [keeps[2]]]
    outcomes = train_fused(template, trains, callbacks)
    assert isinstance(outcomes[1].error, Stop) and outcomes[1].result is None
    assert [len(k.reports) for k in keeps] == [3, 1, 3]
    for i in (0, 2):
        result, reports, _ = separate(params[i], prepared, layout, "adamw")
        assert [r.val_accuracy for r in keeps[i].reports] == pytest.approx([r.val_accuracy for r in reports],
                                                                            abs=1e-6)
        assert outcomes[i].result.best_val_accuracy == pytest.approx(result.best_val_accuracy, abs=1e-6)


def test_only_head_trainings_with_equal_shared_keys_fuse(setup):
    params, _, _ = setup
    head = params[0].train
    assert fuse_key(head) == fuse_key(replace(head, lr=0.5, weight_decay=0.1, schedule="constant"))
    assert fuse_key(head) != fuse_key(replace(head, batch_size=32))
    assert fuse_key(head) != fuse_key(replace(head, seed=1))
    assert fuse_key(replace(head, freeze=replace(head.freeze, strategy="until"))) is None
    assert fuse_key(replace(head, lr="auto")) is None
