"""The lr range test on real photo folders: a finite suggestion inside the range, on the trainable part only,
train.lr=auto trains with it, `freezeflow lr-find` writes the plot and an MLflow run, a sweep centres on it."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import FixedTrial

from freezeflow.core.train.callbacks import Callback
from freezeflow.core.train.lr_finder import find_lr, range_lrs, smooth_losses, suggest_lr
from freezeflow.core.params import load_params
from freezeflow.core.data.prepare import prepare_dataset
from freezeflow.core.layout import Layout
from freezeflow.core.train.run import build_trainer, find_learning_rate, run_training, with_lr
from freezeflow.integrations.tune import FINDER_ATTR, lr_range, prepare_study, suggest_train
from tests.conftest import BIN

# the pretrained EfficientNet-Lite0 (offline weights) on real JPEG patches at 32 px: seconds per run
REAL = {"data.image_size": 32, "train.epochs": 2, "train.batch_size": 16, "train.lr_find.steps": 40}


@pytest.fixture(scope="module")
def textures(photo_folder) -> Path:
    return photo_folder("textures", 10)


def overrides(data: Path, **extra) -> list[str]:
    return [f"{k}={v}" for k, v in ({"data.dir": str(data)} | REAL | extra).items()]


def test_suggestion_is_a_tenth_of_the_lr_at_the_smoothed_minimum():
    lrs = list(range_lrs(1e-6, 1.0, 61))
    losses = [2.0 - 0.02 * i if i < 40 else 1.2 + 0.5 * (i - 40) for i in range(61)]  # falls, then blows up
    smoothed = smooth_losses(losses)
    best = min(range(61), key=lambda i: smoothed[i])
    assert suggest_lr(lrs, smoothed) == pytest.approx(lrs[best] / 10)
    assert lrs[0] <= suggest_lr(lrs, smoothed) <= lrs[-1]
    assert suggest_lr(lrs, [math.nan] * 61) == lrs[0]  # nothing finite: the safest lr tested


@pytest.mark.parametrize("strategy,trainable", [("head", ["head"]), ("until", ["head", "stage7", "stage6"])])
def test_range_test_on_a_real_folder_gives_a_finite_suggestion_inside_its_range(tmp_path, textures, strategy,
                                                                                 trainable):
    params = load_params(Path(__file__).parents[3] / "params",
                         overrides(textures, **{"train.freeze.strategy": strategy, "train.freeze.until": 3}))
    prepared = prepare_dataset(params.data, tmp_path / "prepared")
    trainer = build_trainer(with_lr(params, 1.0), prepared, Layout(tmp_path), [], checkpoint=False)
    result = find_lr(trainer, params.train.lr_find)
    assert math.isfinite(result.suggestion)
    assert params.train.lr_find.start <= result.suggestion <= params.train.lr_find.end
    assert 10 <= len(result.lrs) == len(result.losses) <= params.train.lr_find.steps
    assert result.trainable_stages[:len(trainable)] == trainable
    if strategy == "head":  # fed from the frozen-feature cache: no image went through the body per step
        assert trainer.cache is not None and trainer.cache.builds >= 1 and result.trainable_stages == ["head"]
    # every body group kept its discriminative share of the head's lr during the test
    head_lr = next(g["lr"] for g in trainer.optimizer.param_groups if g["stage"] == len(trainer.model.stages) - 1)
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(head_lr * trainer.plan.lr_scale(group["stage"]))


def test_lr_auto_trains_with_the_suggestion_and_writes_the_resolved_value(tmp_path, textures):
    sets = overrides(textures, **{"train.lr": "auto"})
    params = load_params(Path(__file__).parents[3] / "params", sets)
    prepared = prepare_dataset(params.data, tmp_path / "a" / "prepared")
    expected = find_learning_rate(params, prepared, Layout(tmp_path / "a")).suggestion
    metrics = run_training(params, tmp_path / "b")
    assert metrics["lr"] == pytest.approx(expected)  # seeded: the same range test, the same suggestion
    saved = yaml.safe_load((tmp_path / "b" / "models" / "params.yaml").read_text())
    assert saved["train"]["lr"] == pytest.approx(expected)  # the resolved params, reproducible as they are


def test_lr_find_command_writes_plot_report_and_an_mlflow_run(tmp_path, textures):
    project = tmp_path / "project"
    project.mkdir()
    (project / "params").symlink_to(Path(__file__).parents[3] / "params")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PATH": str(BIN)}
    cmd = [str(BIN / "freezeflow"), "lr-find", *[f"-S{s}" for s in overrides(textures)]]
    done = subprocess.run(cmd, cwd=project, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert "suggested lr" in done.stderr and "train.lr=" in done.stderr
    report = json.loads((project / "reports" / "lr_find.json").read_text())
    assert (project / "reports" / "lr_find.png").stat().st_size > 1000
    run = MlflowClient(env["MLFLOW_TRACKING_URI"]).search_runs(
        [e.experiment_id for e in MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()])[0]
    assert run.data.tags["run_kind"] == "lr_find" and run.info.status == "FINISHED"
    assert float(run.data.params["lr_found"]) == pytest.approx(report["suggestion"], rel=1e-5)
    history = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_metric_history(run.info.run_id, "lr_find_loss")
    assert len(history) == len(report["losses"])
    artifacts = {a.path for a in MlflowClient(env["MLFLOW_TRACKING_URI"]).list_artifacts(run.info.run_id, "plots")}
    assert "plots/lr_find.png" in artifacts


def test_sweep_range_centres_on_the_finder(tmp_path, textures, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the study's store under tmp_path
    sets = overrides(textures, **{"tune.space.lr.around_finder": "true", "tune.space.lr.span": 4.0,
                                  "train.freeze.strategy": "head"})
    settings = prepare_study(tmp_path, str(Path(__file__).parents[3] / "params"), sets)
    study = optuna.load_study(study_name=settings.study_name, storage=settings.storage)
    finder = study.user_attrs[FINDER_ATTR]
    params = load_params(Path(__file__).parents[3] / "params", sets)
    low, high = lr_range(params.tune.space, finder)
    assert low == pytest.approx(finder["suggestion"] / 4) and high == pytest.approx(finder["suggestion"] * 4)
    values = suggest_train(FixedTrial({"batch_size": 16, "lr": finder["suggestion"], "schedule": "constant"}),
                           params.tune.space, params.train, 60, finder)
    assert values["lr"] == pytest.approx(finder["suggestion"])
    again = prepare_study(tmp_path, str(Path(__file__).parents[3] / "params"), sets)  # a joining worker
    assert optuna.load_study(study_name=again.study_name, storage=again.storage).user_attrs[FINDER_ATTR] == finder


def test_a_resumed_auto_lr_run_keeps_the_lr_it_started_with(tmp_path, textures):
    class StopAfterFirstEpoch(Callback):
        def __init__(self):
            self.found: list[float] = []

        def on_lr_found(self, result):
            self.found.append(result.suggestion)

        def on_epoch_end(self, report):
            if report.epoch == 1:
                raise KeyboardInterrupt  # a crash right after epoch 1 was checkpointed

    params = load_params(Path(__file__).parents[3] / "params", overrides(textures, **{"train.lr": "auto"}))
    first = StopAfterFirstEpoch()
    with pytest.raises(KeyboardInterrupt):
        run_training(params, tmp_path, callbacks=[first])
    again = StopAfterFirstEpoch()
    metrics = run_training(params, tmp_path, resume=True, callbacks=[again])
    assert again.found == [], "the range test does not run again on resume"
    assert metrics["lr"] == pytest.approx(first.found[0]) and metrics["epochs"] == 2
