"""A project with one tracked training in a real sqlite MLflow store (test_tracking, test_registry)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from freezeflow.core.params import load_params
from freezeflow.integrations.tracking import tracked_training, tracking_scope
from tests.conftest import REPO, write_figures_dataset


def store_uri(root: Path) -> str:
    return f"sqlite:///{root / 'store' / 'mlflow.db'}"


def store(root: Path) -> MlflowClient:
    """A client on the test's store, explicitly: another test may have set mlflow's global URI."""
    return MlflowClient(store_uri(root))


@pytest.fixture(scope="module")
def tracked_project(tmp_path_factory):
    """(root, params, result): data, params and a sqlite store under root; one tracked 2-epoch training."""
    root = tmp_path_factory.mktemp("tracking")
    data = write_figures_dataset(root / "data" / "shapes")
    shutil.copytree(REPO / "params", root / "params", ignore=shutil.ignore_patterns("best.yaml"))
    params = load_params(root / "params", [f"data.dir={data}", "data.image_size=32", "train.backbone=resnet18",
                                           "train.weights=none", "train.epochs=2", "train.batch_size=8"])
    (root / "store").mkdir()
    # mlflow's own helpers (runs:/ listing) read its global URI, which another test may have set
    with pytest.MonkeyPatch.context() as mp, tracking_scope(store_uri(root)):
        mp.setenv("MLFLOW_TRACKING_URI", store_uri(root))
        result = tracked_training(params, root, run_name="first", extra_tags={"purpose": "test"})
        yield root, params, result
