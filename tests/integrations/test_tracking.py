"""tracked_training against a real sqlite MLflow store in tmp_path, on real PNG files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import CLASSES, write_figures_dataset
from freezeflow.core.errors import UserError
from freezeflow.core.models.io import load_model, predict_images
from freezeflow.core.params import load_params
from freezeflow.core.train.callbacks import Callback
from freezeflow.core.infer.predict import predict_files
from freezeflow.integrations.tracking import (load_downloaded, load_registered, register_model, resolve_tracking_uri,
                                 tracked_training, tracking_scope)

PARAMS = Path(__file__).resolve().parents[2] / "params"
class Raise(Callback):
    """A callback that raises `exc` at the end of epoch 1."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def on_epoch_end(self, report) -> None:
        raise self.exc


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project root with data, params and a sqlite store; one tracked 2-epoch training."""
    root = tmp_path_factory.mktemp("tracking")
    data = write_figures_dataset(root / "data" / "shapes")
    shutil.copytree(PARAMS, root / "params")
    params = load_params(root / "params", [f"data.dir={data}", "data.image_size=32", "train.backbone=resnet18",
                                           "train.weights=none", "train.epochs=2", "train.batch_size=8"])
    (root / "store").mkdir()
    # mlflow's own helpers (runs:/ listing) read its global URI, which another test may have set
    with pytest.MonkeyPatch.context() as mp, tracking_scope(store_uri(root)):
        mp.setenv("MLFLOW_TRACKING_URI", store_uri(root))
        result = tracked_training(params, root, run_name="first", extra_tags={"purpose": "test"})
        yield root, params, result


def store_uri(root: Path) -> str:
    return f"sqlite:///{root / 'store' / 'mlflow.db'}"


def store(root: Path) -> MlflowClient:
    """A client on the test's store, explicitly: another test may have set mlflow's global URI."""
    return MlflowClient(store_uri(root))


def test_tracked_run_logs_params_epochs_and_artifacts(project):
    root, params, result = project
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
    assert {"model/MLmodel", "model/model.json", "model/weights"} <= model_files


def test_registered_champion_loads_and_predicts_class_names(project):
    root, _, result = project
    version = register_model(result["run_id"], "shapes", alias="champion")
    client = store(root)
    assert int(client.get_model_version_by_alias("shapes", "champion").version) == version
    model, info = load_registered("models:/shapes@champion")
    assert info.classes == list(CLASSES) and info.image_size == 32
    local, _ = load_model(root / "models")
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(predict_images(model, info, x), predict_images(local, info, x), atol=1e-6)
    rows = predict_files(model, info, [root / "data" / "shapes"])
    assert len(rows) == 3 * 12 and {r["label"] for r in rows} <= set(CLASSES)
    same, _ = load_registered(result["run_id"])  # a bare run id means runs:/<id>/model
    assert torch.equal(same.stages[-1][-1].weight, model.stages[-1][-1].weight)


def test_pytorch_flavor_loads_back_with_mlflow(project):
    import mlflow.artifacts
    import mlflow.pytorch

    root, _, result = project
    local = mlflow.artifacts.download_artifacts(f"runs:/{result['run_id']}/model", tracking_uri=store_uri(root))
    exported = mlflow.pytorch.load_model(local)
    assert exported(torch.zeros(3, 3, 32, 32)).shape == (3, 3)  # batch dimension is dynamic


def runs_named(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name("shapes")
    return client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{name}'")


def steps(client: MlflowClient, run, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def test_failing_training_ends_the_run_failed(project):
    root, params, _ = project
    with pytest.raises(RuntimeError, match="boom"):
        tracked_training(params, root, run_name="broken", callbacks=[Raise(RuntimeError("boom"))])
    [run] = runs_named(store(root), "broken")
    assert run.info.status == "FAILED" and steps(store(root), run, "val_accuracy") == [1]
    assert run.data.tags["error"] == "RuntimeError: boom"


def test_interrupted_run_is_killed_and_resume_logs_every_epoch(project):
    root, params, _ = project
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


def test_weights_that_would_run_code_are_refused(tmp_path, project):
    root, _, _ = project

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "weights").mkdir()
    shutil.copy(root / "models" / "model.json", tmp_path / "model.json")
    torch.save({"x": Evil()}, tmp_path / "weights" / "model.pt")
    with pytest.raises(UserError, match="refused"):
        load_downloaded(tmp_path, "models:/evil@champion")


def test_unknown_alias_is_a_user_error(project):
    with pytest.raises(UserError, match="models:/shapes@challenger"):
        load_registered("models:/shapes@challenger")
