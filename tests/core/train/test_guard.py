"""The divergence guard on real photo folders: a deliberately too-high lr is named in one line (NaN stops the
run; chance-level val accuracy is compared with the head alone), MLflow records it, a sweep prunes such a
trial, and the defaults stay silent."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from freezeflow.core.train.callbacks import Callback
from freezeflow.core.train.guard import TrainingDiverged, chance_threshold
from freezeflow.core.params import load_params
from freezeflow.core.train.run import run_training
from freezeflow.integrations.tune import run_tune
from tests.conftest import BIN, REPO, write_shapes_dataset
from tests.integrations.test_tune import make_project, open_study

SMALL = {"data.image_size": 32, "train.epochs": 3, "train.batch_size": 16}
# AdamW's decoupled decay multiplies each weight by (1 - lr * wd) = -9 per step: the head's weights
# overflow within a few dozen steps and the loss turns NaN, deterministically
EXPLODING = {"train.freeze.strategy": "head", "train.lr": 10, "train.weight_decay": 1.0, "train.schedule": "constant",
             "train.batch_size": 4, "train.epochs": 4}


def params_for(data: Path, **extra):
    return load_params(REPO / "params", [f"{k}={v}" for k, v in ({"data.dir": str(data)} | SMALL | extra).items()])


def test_chance_threshold_is_the_majority_rate_plus_two_sigmas():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    assert chance_threshold(labels, 3) == pytest.approx(0.5 + 2 * (0.25 / 100) ** 0.5)
    assert chance_threshold(np.array([0, 1, 2, 3] * 8), 4) == pytest.approx(0.25 + 2 * (0.25 * 0.75 / 32) ** 0.5)
    assert chance_threshold(np.array([0, 1, 2, 3]), 4) is None  # 4 val images cannot tell chance from learning


def test_nan_loss_stops_training_with_one_line_naming_the_lr(tmp_path, photo_folder):
    with pytest.raises(TrainingDiverged) as caught:
        run_training(params_for(photo_folder("textures", 10), **EXPLODING), tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "train loss is nan" in message and "lower train.lr (10)" in message
    assert not (tmp_path / "models").exists(), "a diverged run must not write a model"


def test_body_lr_too_high_is_reported_against_the_head_alone(tmp_path, photo_folder):
    warnings = []

    class Listener(Callback):
        def on_divergence(self, message):
            warnings.append(message)

    params = params_for(photo_folder("textures", 40), **{"train.freeze.strategy": "none", "train.lr": 0.1,
                                                        "train.body_lr_factor": 1.0})
    metrics = run_training(params, tmp_path, callbacks=[Listener()])
    assert metrics["epochs"] == 3, "chance level is reported, the run goes on"
    assert warnings == [metrics["divergence"]]
    assert "is at chance" in warnings[0] and "while the head alone reaches" in warnings[0]
    assert "train.body_lr_factor (1)" in warnings[0] and "\n" not in warnings[0]


@pytest.mark.parametrize("strategy", ["head", "until", "none", "gradual", "freezeout"])
def test_the_defaults_stay_silent_on_a_real_folder(tmp_path, photo_folder, strategy):
    params = load_params(REPO / "params", [f"data.dir={photo_folder('scenes', 40)}", "train.epochs=3",
                                           f"train.freeze.strategy={strategy}"])
    assert run_training(params, tmp_path)["divergence"] is None


def test_cli_prints_the_cause_in_one_line_and_mlflow_records_it(tmp_path, photo_folder):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [f"-S{k}={v}" for k, v in ({"data.dir": photo_folder("textures", 10)} | SMALL | EXPLODING).items()]
    (tmp_path / "params").symlink_to(REPO / "params")
    done = subprocess.run([str(BIN / "freezeflow"), "train", *sets], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={"MLFLOW_TRACKING_URI": uri, "PATH": str(BIN)})
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged" in errors[0] and "train.lr" in errors[0]
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    assert "training diverged" in run.data.tags["divergence"] and "TrainingDiverged" in run.data.tags["error"]


def test_a_diverged_trial_is_pruned_not_completed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = make_project(tmp_path, **{"train.weight_decay": 1.0, "tune.space.lr.low": 10.0,
                                          "tune.space.lr.high": 10.0, "tune.space.batch_size.choices": "[4]",
                                          "tune.space.schedule.choices": "[constant]", "tune.epochs": 4})
    write_shapes_dataset(tmp_path / "data" / "shapes", classes=3, per_class=40)  # enough steps to overflow
    run_tune(tmp_path, "params", overrides, workers=1, n_trials=2)
    trials = open_study(f"sqlite:///{tmp_path.resolve() / 'optuna' / 'optuna.db'}").get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert all(t.user_attrs["pruned_reason"] == "diverged" and t.user_attrs["divergence"] for t in trials)
    client = MlflowClient(f"sqlite:///{tmp_path.resolve() / 'mlflow' / 'mlflow.db'}")
    children = [client.get_run(t.user_attrs["mlflow_run_id"]) for t in trials]
    assert all(c.info.status == "KILLED" and c.data.tags.get("divergence") for c in children)
