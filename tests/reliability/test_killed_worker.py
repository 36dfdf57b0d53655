"""Killed sweep worker: SIGKILL mid-trial; the trial ends FAIL, is retried, the study finishes its budget,
and no Optuna trial or MLflow run is left RUNNING."""

from __future__ import annotations

import os
import signal
import time

import optuna
import pytest
from optuna.trial import TrialState

from freezeflow.integrations.tune import prepare_study, start_workers
from tests.integrations.test_tune import DONE, counts, make_project, mlflow_client, open_study

def wait_for_running_trial(url: str, timeout: float = 240.0) -> optuna.trial.FrozenTrial:
    """The first trial that is RUNNING and has reported an epoch (so it is mid-training)."""
    study = open_study(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            if trial.intermediate_values:
                return trial
        time.sleep(0.05)
    raise AssertionError("no trial started within the timeout")


@pytest.mark.slow
def test_killed_worker_leaves_no_running_trial_and_its_trial_is_retried(project, monkeypatch):
    from tasks.tune import tune_task

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = make_project(project, **{"tune.heartbeat_interval": 1, "tune.grace_period": 3, "tune.pruner": "none",
                                         "tune.epochs": 3, "tune.n_trials": 2, "train.freeze.strategy": "none",
                                         "tune.space.batch_size.choices": "[16]"})  # slower epochs: time to kill
    settings = prepare_study(project, "params", overrides, workers=1)
    [victim] = start_workers(settings, 1)
    try:
        killed = wait_for_running_trial(settings.storage)
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        victim.join(30)
    assert victim.exitcode == -signal.SIGKILL
    assert open_study(settings.storage).trials[killed.number].state == TrialState.RUNNING  # stuck until...

    summary = tune_task.fn(str(project), "params", overrides)  # ...another worker joins (the Prefect task)
    study = open_study(settings.storage)
    assert study.trials[killed.number].state == TrialState.FAIL  # heartbeat expired
    [retry] = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == killed.params and retry.state in DONE
    assert counts(study)["RUNNING"] == 0 and counts(study)["COMPLETE"] + counts(study)["PRUNED"] == 2
    assert summary["n_failed"] == 1 and summary["n_complete"] == 2
    child = mlflow_client(project).get_run(killed.user_attrs["mlflow_run_id"])
    assert child.info.status == "FAILED" and child.data.tags["optuna_state"] == "FAIL"
