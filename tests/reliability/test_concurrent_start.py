"""Two `freezeflow train` started at once in a fresh project: the MLflow store is created and migrated once,
under a file lock beside mlflow.db, so both trainings finish and both runs are in the store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import REPO, run, tiny_overrides, write_shapes_dataset


def cli_env() -> dict:
    """The project's default store (no MLFLOW_TRACKING_URI), this checkout's code."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return env | {"PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def test_two_trainings_started_at_once_both_finish_in_one_fresh_store(project: Path):
    write_shapes_dataset(project / "data" / "shapes", classes=3, per_class=8)
    sets = [f"-S{s}" for s in tiny_overrides(project / "data" / "shapes", **{"train.epochs": 1})]
    cli = [sys.executable, "-m", "freezeflow.app.cli"]
    # prepared/ first (no MLflow involved): what races here is the store, not two decodes of the same data
    run([*cli, "prepare", *sets], project, cli_env())
    assert not (project / "mlflow" / "mlflow.db").exists()  # fresh: neither process finds tables
    procs = [subprocess.Popen([*cli, "train", *sets], cwd=project, env=cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [out[-1500:] for out in outputs]
    assert (project / "mlflow" / "mlflow.db.lock").exists()  # the lock lives beside the database
    client = MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("shapes")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert [len(r.inputs.dataset_inputs) for r in runs] == [1, 1]  # each logged its dataset
