"""The training loop: resume is bit-exact, the feature cache is built once and reused, checkpoints are safe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from freezeflow.core.errors import UserError
from freezeflow.core.params import load_params
from freezeflow.core.data.prepare import prepare_dataset
from freezeflow.core.layout import Layout
from freezeflow.core.train.callbacks import Callback
from freezeflow.core.train.run import build_trainer, run_training
from tests.conftest import tiny_overrides


class StopAfter(Callback):
    """Simulates a crash right after epoch `epoch` was checkpointed."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, report) -> None:
        if report.epoch == self.epoch:
            raise KeyboardInterrupt


def trainer_for(root: Path, overrides: list[str], callbacks=()):
    params = load_params(root / "params", overrides)
    layout = Layout(root)
    prepared = prepare_dataset(params.data, layout.prepared)
    return build_trainer(params, prepared, layout, list(callbacks))


def clone_project(project: Path, name: str) -> Path:
    import shutil

    dst = project.parent / name
    shutil.copytree(project / "params", dst / "params")
    return dst


@pytest.mark.parametrize("strategy", ["head", "until", "gradual", "freezeout", "none"])
def test_resume_is_bit_exact_on_cpu(project, shapes_dir, strategy):
    overrides = tiny_overrides(shapes_dir, **{"train.freeze.strategy": strategy, "train.freeze.t0": 0.5,
                                              "train.freeze.until": 2, "train.body_lr_factor": 0.2,
                                              "train.lr_decay": 0.7, "train.schedule": "cosine",
                                              "train.label_smoothing": 0.1})
    straight = trainer_for(clone_project(project, "a"), overrides)
    straight.run()

    root_b = clone_project(project, "b")
    first = trainer_for(root_b, overrides, [StopAfter(2)])
    with pytest.raises(KeyboardInterrupt):
        first.run()
    resumed = trainer_for(root_b, overrides)
    resumed.load_checkpoint(Layout(root_b).checkpoint)
    assert resumed.epoch == 2
    groups_before = [g["stage"] for g in resumed.optimizer.param_groups]
    assert len(groups_before) == len(set(groups_before)), "duplicated param groups after resume"
    resumed.run()

    assert resumed.frozen == straight.frozen
    assert [g["stage"] for g in resumed.optimizer.param_groups] == [g["stage"] for g in straight.optimizer.param_groups]
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), f"{strategy}: {name} differs after resume"
    assert [r.val_loss for r in resumed.history] == [r.val_loss for r in straight.history]
    # the discriminative rates survive the resume: same peak lr per stage, same lrs logged every epoch
    decay = resumed.params.freeze.lr_decay if strategy == "gradual" else 0.7  # gradual keeps freeze.lr_decay
    share = {g["stage"]: g["base_lr"] / 0.01 for g in resumed.optimizer.param_groups}
    assert share == {i: pytest.approx(1.0 if i == 5 else 0.2 * decay ** (4 - i)) for i in share}
    assert [r.lrs for r in resumed.history] == [r.lrs for r in straight.history]


def test_feature_cache_is_built_once_and_reused_across_runs(project, shapes_dir):
    overrides = tiny_overrides(shapes_dir, **{"train.freeze.strategy": "head"})
    first = trainer_for(project, overrides)
    first.run()
    assert first.cache.builds == 2  # train and val features of the frozen prefix, once (test: on demand)
    assert all(r.from_cache for r in first.history)
    second = trainer_for(project, overrides)
    second.run()
    assert second.cache.builds == 0  # read back from cache/features, no image touched
    assert len(list((project / "cache" / "features").iterdir())) == 1


def test_gradual_builds_one_level_per_unfrozen_stage(project, shapes_dir):
    trainer = trainer_for(project, tiny_overrides(shapes_dir, **{"train.freeze.strategy": "gradual"}))
    trainer.run()
    levels = sorted(p.name.split("-")[1] for p in (project / "cache" / "features").iterdir())
    assert levels == ["L2", "L3", "L4", "L5"]


def test_augment_views_cycle_by_epoch(project, shapes_dir):
    overrides = tiny_overrides(shapes_dir, **{"train.freeze.strategy": "head", "train.augment.enabled": "true",
                                              "train.augment_views": 2})
    trainer = trainer_for(project, overrides)
    feats = trainer.cache.level(5)
    assert feats["train"].shape[0] == 2 and feats["val"].shape[0] == 1
    assert not (np.asarray(feats["train"][0]) == np.asarray(feats["train"][1])).all()  # two different augmented views
    trainer.run()
    assert all(r.from_cache for r in trainer.history)


def test_cache_on_with_random_augmentation_is_refused(project, shapes_dir):
    overrides = tiny_overrides(shapes_dir, **{"train.augment.enabled": "true", "train.cache_features": "on"})
    with pytest.raises(UserError, match="augment_views"):
        trainer_for(project, overrides)


def test_run_training_writes_model_metrics_and_history(project, shapes_dir):
    params = load_params(project / "params", tiny_overrides(shapes_dir, **{"train.early_stopping": 2}))
    metrics = run_training(params, project)
    saved = json.loads((project / "reports" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("val_accuracy", "test_accuracy", "epochs", "epoch_time_s", "train_time_s", "images_per_s"):
        assert key in saved
    assert len(saved["epoch_time_s"]) == saved["epochs"] <= 4
    history = json.loads((project / "reports" / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, saved["epochs"] + 1))
    assert "lr/head" in history[0]
    assert (project / "models" / "model.pt").exists() and (project / "models" / "params.yaml").exists()


def test_resume_refuses_a_checkpoint_from_other_params(project, shapes_dir):
    first = trainer_for(project, tiny_overrides(shapes_dir, **{"train.epochs": 1}))
    first.run()
    other = trainer_for(project, tiny_overrides(shapes_dir, **{"train.lr": 0.5}))
    with pytest.raises(UserError, match="other params"):
        other.load_checkpoint(Layout(project).checkpoint)
