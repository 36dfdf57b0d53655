"""tune_plan: the sweep's predicted cost, before anything runs (`freezeflow tune --plan`), and afterwards
predicted against measured on the parent MLflow run.

A configuration is a cut level (how many stages are frozen and cached: `head`, `until` k, or 0 for the
strategies that train every stage at some point, predicted as `none`: their upper bound) times a batch
size. Its cost comes from core.train.costs: per-stage FLOPs and one short calibration of this machine.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import optuna
from mlflow.tracking import MlflowClient

from freezeflow.core.data.prepare import Prepared
from freezeflow.core.models.registry import build_backbone
from freezeflow.core.models.staged import count_stage_flops
from freezeflow.core.params import Params
from freezeflow.core.train.costs import TrialCost, calibrate, predict_cost, predict_sweep

CALIBRATION_BATCH = 32  # at most: a batch the size of training's, capped to keep the calibration short
# a trial's cost outside its loop until a sweep of the study has measured it (trial_fixed_s_median, which the
# study then keeps as its user attr FIXED_ATTR): 0.56 s measured on this project's 2-core CPU, 2026-12-04
DEFAULT_TRIAL_FIXED_S = 0.5
FIXED_ATTR = "trial_fixed_s"


def cut_of(strategy: str, until: int, n_stages: int) -> int:
    """Stages frozen (and cached) for the whole training: head n-1, until k, the rest 0 (upper bound)."""
    return {"head": n_stages - 1, "until": until}.get(strategy, 0)


def space_cuts(params: Params, n_stages: int) -> list[tuple[str, int]]:
    """(label, cut) of every freezing the space can draw, or the train params' own when freeze is off."""
    space, freeze = params.tune.space.freeze, params.train.freeze
    if not space.enabled:
        label = freeze.strategy + (f" {freeze.until}" if freeze.strategy == "until" else "")
        return [(label, cut_of(freeze.strategy, freeze.until, n_stages))]
    out = []
    for strategy in space.choices:
        if strategy == "until":
            out += [(f"until {k}", k) for k in range(space.until_low, space.until_high + 1)]
        else:
            out.append((strategy, cut_of(strategy, 0, n_stages)))
    return out


def space_batches(params: Params, n_train: int) -> list[int]:
    from freezeflow.integrations.tune import batch_choices

    space = params.tune.space
    return batch_choices(space, n_train) if space.batch_size.enabled else [params.train.batch_size]


def plan_sweep(params: Params, prepared: Prepared, n_trials: int,
               fixed_s: float = DEFAULT_TRIAL_FIXED_S) -> dict[str, Any]:
    """Every configuration's predicted seconds, and the sweep's (n_trials drawn evenly among them);
    `fixed_s`: each trial's cost outside its training loop."""
    t = params.train
    model = build_backbone(t.backbone, weights="none", num_classes=len(prepared.classes))  # speed only
    size = params.data.image_size
    flops = count_stage_flops(model, size)
    n_train, n_val = len(prepared.split["train"]), len(prepared.split["val"])
    calibration = calibrate(model, flops, size, min(CALIBRATION_BATCH, t.batch_size))
    rows, costs = [], []
    for label, cut in space_cuts(params, len(model.stages)):
        for batch in space_batches(params, n_train):
            cost = predict_cost(flops, cut, batch, n_train, n_val, params.tune.epochs, calibration, fixed_s)
            costs.append(cost)
            rows.append({"freeze": label, **cost.to_dict()})
    return {"backbone": t.backbone, "image_size": size, "images": {"train": n_train, "val": n_val},
            "epochs": params.tune.epochs, "stage_gflops": [round(f / 1e9, 4) for f in flops],
            "calibration": calibration.to_dict(), "trial_fixed_s": fixed_s, "configurations": rows,
            "sweep": predict_sweep(costs, n_trials)}


def format_plan(plan: dict) -> list[str]:
    """The plan as lines for the terminal: one per configuration, then the sweep."""
    lines = [f"{plan['backbone']} at {plan['image_size']} px, {plan['images']['train']} train / "
             f"{plan['images']['val']} val images, {plan['epochs']} epochs per trial "
             f"(calibrated in {plan['calibration']['seconds']} s; {plan['trial_fixed_s']:.2f} s fixed per trial)",
             f"{'freeze':<12} {'batch':>5} {'feature build s':>16} {'per epoch s':>12} {'trial s':>9}"]
    for row in plan["configurations"]:
        lines.append(f"{row['freeze']:<12} {row['batch_size']:>5} {row['feature_build_s']:>16.2f} "
                     f"{row['epoch_s']:>12.2f} {row['trial_s']:>9.2f}")
    sweep = plan["sweep"]
    lines.append(f"sweep of {sweep['trials']} trials: at most {sweep['total_s']:.1f} s "
                 f"({sweep['train_s']:.1f} s trials + {sweep['feature_build_s']:.1f} s feature builds, once per "
                 "cut level; pruned trials stop early)")
    return lines


def trial_prediction(trial: optuna.trial.FrozenTrial, params: Params, plan: dict) -> float | None:
    """The plan's trial_s for the configuration this trial drew (its `train` user attr), if planned."""
    values = trial.user_attrs.get("train", {})
    strategy = values.get("freeze.strategy", params.train.freeze.strategy)
    until = values.get("freeze.until", params.train.freeze.until)
    batch = values.get("batch_size", params.train.batch_size)
    label = f"until {until}" if strategy == "until" else strategy
    for row in plan["configurations"]:
        if row["freeze"] == label and row["batch_size"] == batch:
            return row["trial_s"]
    return None


def log_plan_outcome(client: MlflowClient, run_id: str, plan: dict, study: optuna.Study, params: Params,
                     measured_s: float) -> dict:
    """On the parent run: plan_predicted_s (the trials that ran, plus one feature build per cut level),
    plan_measured_s (the sweep's wall time here), trial_fixed_s_median (a trial's time outside its training
    loop) and plan.json with each trial's predicted, measured and fixed seconds."""
    trials = []
    for trial in study.trials:
        if trial.datetime_start is None or trial.datetime_complete is None:
            continue
        # ran_s: the trial's own time (a fused member's share of its group's); a companion asked with others
        # waits for them, so its start-to-complete span is not its cost
        measured = trial.user_attrs.get("ran_s") or (trial.datetime_complete - trial.datetime_start).total_seconds()
        loop = trial.user_attrs.get("train_time_s")  # completed trials: the training loop's own time
        trials.append({"number": trial.number, "state": trial.state.name,
                       "predicted_s": trial_prediction(trial, params, plan), "measured_s": round(measured, 3),
                       "fixed_s": round(measured - loop, 3) if loop is not None else None})
    predicted = sum(t["predicted_s"] or 0.0 for t in trials) + plan["sweep"]["feature_build_s"]
    fixed = sorted(t["fixed_s"] for t in trials if t["fixed_s"] is not None)
    outcome = {"predicted_s": round(predicted, 2), "measured_s": round(measured_s, 2), "trials": trials,
               "trial_fixed_s_median": fixed[len(fixed) // 2] if fixed else None}
    client.log_metric(run_id, "plan_predicted_s", outcome["predicted_s"])
    client.log_metric(run_id, "plan_measured_s", outcome["measured_s"])
    if fixed:  # a trial's time outside its training loop: MLflow child run, trainer, feature lookup
        client.log_metric(run_id, "trial_fixed_s_median", outcome["trial_fixed_s_median"])
        study.set_user_attr(FIXED_ATTR, outcome["trial_fixed_s_median"])  # the study's next plan uses it
    with tempfile.TemporaryDirectory(prefix="freezeflow-plan-") as tmp:
        path = Path(tmp) / "plan.json"
        path.write_text(json.dumps(plan | {"outcome": outcome}, indent=2))
        client.log_artifact(run_id, str(path), "reports")
    return outcome
