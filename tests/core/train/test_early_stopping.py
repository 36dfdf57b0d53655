"""Early stopping (train.early_stopping: patience in epochs) keeps the best epoch's weights: the saved model
scores what the best epoch scored on val, not what the last epoch did."""

from __future__ import annotations

import json

import numpy as np
import pytest

from freezeflow.core.data.prepare import open_prepared
from freezeflow.core.infer.evaluate import evaluate_model, predict_split_probabilities
from freezeflow.core.layout import Layout
from freezeflow.core.models.io import load_model
from freezeflow.core.params import load_params
from freezeflow.core.train.run import run_training
from tests.conftest import tiny_overrides

PATIENCE = 2


def test_early_stopping_saves_the_best_epochs_weights(project, shapes_dir):
    # a linear warmup to a far too high lr: the first epochs learn, the later ones unlearn (val gets worse)
    overrides = tiny_overrides(shapes_dir, **{"train.freeze.strategy": "none", "train.epochs": 8,
                                              "train.lr": 0.1, "train.warmup_epochs": 10,
                                              "train.early_stopping": PATIENCE})
    params = load_params(project / "params", overrides)
    metrics = run_training(params, project)
    layout = Layout(project)
    history = json.loads((layout.reports / "history.json").read_text())
    best, last = history[metrics["best_epoch"] - 1], history[-1]
    assert metrics["stopped_early"] and metrics["epochs"] == len(history) == metrics["best_epoch"] + PATIENCE < 8
    assert best["val_accuracy"] == max(row["val_accuracy"] for row in history)
    assert last["val_accuracy"] < best["val_accuracy"], "no worse last epoch: the test would prove nothing"
    assert metrics["val_accuracy"] == best["val_accuracy"] and metrics["val_loss"] == best["val_loss"]

    prepared = open_prepared(params, layout)
    assert evaluate_model(layout.models, prepared, "val")["accuracy"] == pytest.approx(best["val_accuracy"])
    model, info = load_model(layout.models)
    probs = predict_split_probabilities(model, info, prepared, "val")
    y = prepared.labels[prepared.split["val"]]
    val_loss = float(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-30)).mean())
    assert val_loss == pytest.approx(best["val_loss"], rel=1e-3)  # the best epoch's weights, bit for bit in effect
    assert val_loss != pytest.approx(last["val_loss"], rel=1e-3)
