"""tracked_training against a real sqlite MLflow store in tmp_path, on real PNG files."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from freezeflow.integrations.tracking import resolve_tracking_uri, tracked_training
from tests.integrations.conftest import store, store_uri

from freezeflow.core.train.callbacks import Callback


class Raise(Callback):
    """A callback that raises `exc` at the end of epoch 1."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def on_epoch_end(self, report) -> None:
        raise self.exc


def test_tracked_run_logs_params_epochs_and_artifacts(tracked_project):
    root, params, result = tracked_project
    client = store(root)
    experiment = client.get_experiment_by_name("shapes")
    runs = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'first'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_id == result["run_id"]
    run = runs[0]
    assert run.data.params["train.freeze.strategy"] == "head" and run.data.params["data.image_size"] == "32"
    for key in ("val_accuracy", "time_per_epoch_s", "lr_head", "frozen_stages"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert set(run.data.metrics).issuperset({"test_accuracy", "train_time_s", "best_val_accuracy", "peak_rss_mb"})
    assert run.data.tags["data_hash"] == result["data_hash"] and run.data.tags["purpose"] == "test"
    assert {"git_commit", "device", "torch_version", "python_version"} <= set(run.data.tags)
    assert experiment.artifact_location.startswith((root / "store" / "artifacts").as_uri())
    plots = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"learning_curves.png", "lr_groups.png", "epoch_times.png", "confusion_val.png",
                     "per_class_val.png"}
    reports = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"metrics.json", "history.json", "eval_val.json"} <= reports
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/MLmodel", "model/serving_model.py", "model/artifacts", "model/code"} <= model_files
    bundle = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model/artifacts")}
    assert bundle == {"model.json", "weights.npz"}  # serve.runtime torch: no model.onnx
    assert run.data.tags["model_format"] == "pyfunc-npz"


def test_pyfunc_loads_back_with_mlflow_and_takes_any_batch(tracked_project):
    import base64

    import mlflow.artifacts
    import mlflow.pyfunc
    import pandas as pd

    root, _, result = tracked_project
    local = mlflow.artifacts.download_artifacts(f"runs:/{result['run_id']}/model", tracking_uri=store_uri(root))
    served = mlflow.pyfunc.load_model(local)
    files = sorted((root / "data" / "shapes").rglob("*.png"))[:3]
    for batch in (files, files[:1]):  # no fixed batch size
        out = served.predict(pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode() for f in batch]}))
        assert list(out.columns) == ["label", "probability", "top", "error"] and len(out) == len(batch)
        assert out["error"].isna().all() and set(out["label"]) <= {"circle", "square", "stripes"}


def runs_named(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name("shapes")
    return client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{name}'")


def steps(client: MlflowClient, run, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def test_failing_training_ends_the_run_failed(tracked_project):
    root, params, _ = tracked_project
    with pytest.raises(RuntimeError, match="boom"):
        tracked_training(params, root, run_name="broken", callbacks=[Raise(RuntimeError("boom"))])
    [run] = runs_named(store(root), "broken")
    assert run.info.status == "FAILED" and steps(store(root), run, "val_accuracy") == [1]
    assert run.data.tags["error"] == "RuntimeError: boom"


def test_interrupted_run_is_killed_and_resume_logs_every_epoch(tracked_project):
    root, params, _ = tracked_project
    with pytest.raises(KeyboardInterrupt):
        tracked_training(params, root, run_name="interrupted", callbacks=[Raise(KeyboardInterrupt())])
    [killed] = runs_named(store(root), "interrupted")
    assert killed.info.status == "KILLED" and steps(store(root), killed, "val_accuracy") == [1]
    tracked_training(params, root, resume=True, run_name="resumed")
    [resumed] = runs_named(store(root), "resumed")
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed"] == "true"
    assert steps(store(root), resumed, "val_accuracy") == [1, 2]  # epoch 1 comes from the checkpoint's history


def test_default_store_is_a_sqlite_file_under_the_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow' / 'mlflow.db'}"
    assert (tmp_path / "mlflow").is_dir()
