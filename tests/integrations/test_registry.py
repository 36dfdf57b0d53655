"""The model registry against a real sqlite MLflow store: register, promote or keep, load back safely."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from freezeflow.core.data.images import decode_rgb
from freezeflow.core.data.preprocess import preprocess_images
from freezeflow.core.errors import UserError
from freezeflow.core.infer.predict import DEFAULT_MAX_PIXELS, predict_files
from freezeflow.core.models.io import load_model, predict_images
from freezeflow.integrations.registry import (champion_info, decide_promotion, load_downloaded, load_registered,
                                              promote_or_keep, register_model)
from tests.conftest import CLASSES
from tests.integrations.conftest import store, store_uri


def test_registered_champion_loads_and_predicts_class_names(tracked_project):
    root, _, result = tracked_project
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


def test_promote_or_keep_aliases_and_tags_the_reason(tracked_project):
    root, _, result = tracked_project
    uri = store_uri(root)
    first = promote_or_keep(result["run_id"], "promoted", 0.8, tracking_uri=uri)
    assert first["alias"] == "champion" and first["reason"] == "no champion yet"
    assert str(champion_info("promoted", uri)["version"]) == first["version"]
    champion = champion_info("promoted", uri)["val_accuracy"]  # the run's best_val_accuracy
    second = promote_or_keep(result["run_id"], "promoted", champion, margin=0.01, tracking_uri=uri)
    assert second["alias"] == "challenger" and second["version"] != first["version"]
    assert second["reason"] == decide_promotion(champion, champion, 0.01).reason
    assert "does not beat champion" in second["reason"]
    client = store(root)
    assert str(client.get_model_version_by_alias("promoted", "champion").version) == first["version"]
    challenger = client.get_model_version_by_alias("promoted", "challenger")
    assert str(challenger.version) == second["version"] and challenger.tags["decision"] == second["reason"]
    with pytest.raises(UserError, match="--alias: 'best' is not allowed; allowed: champion, challenger"):
        register_model(result["run_id"], "promoted", alias="best", tracking_uri=uri)


class WritesMarker:
    """A pickle payload: unpickling it calls open(marker, "w"), which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_weights_that_would_run_code_are_refused(tmp_path, tracked_project):
    root, _, _ = tracked_project
    model_dir, marker = tmp_path / "model", tmp_path / "code-ran"
    (model_dir / "weights").mkdir(parents=True)
    shutil.copy(root / "models" / "model.json", model_dir / "model.json")
    torch.save({"x": WritesMarker(marker)}, model_dir / "weights" / "model.pt")
    with pytest.raises(UserError, match="refused"):
        load_downloaded(model_dir, "models:/evil@champion")
    assert not marker.exists()  # the payload never ran
    torch.load(model_dir / "weights" / "model.pt", weights_only=False)  # the control: a plain unpickle runs it
    assert marker.exists()


def test_unknown_alias_is_a_user_error(tracked_project):
    with pytest.raises(UserError, match="models:/shapes@challenger"):
        load_registered("models:/shapes@challenger")


def test_logged_pyfunc_model_gives_the_probabilities_predict_gives(tracked_project):
    """The MLflow model's forward takes preprocess_images' output: softmax of its logits is what predict says."""
    import mlflow.artifacts
    import mlflow.pyfunc

    root, _, result = tracked_project
    model, info = load_registered(result["run_id"])
    files = sorted((root / "data" / "shapes").rglob("*.png"))[::7]
    local = mlflow.artifacts.download_artifacts(f"runs:/{result['run_id']}/model", tracking_uri=store_uri(root))
    x = preprocess_images([decode_rgb(f, DEFAULT_MAX_PIXELS) for f in files], info.image_size, info.mean, info.std)
    logits = np.asarray(mlflow.pyfunc.load_model(local).predict(x.numpy()))  # (n, classes)
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    rows = predict_files(model, info, files)  # top-3 of 3 classes: every probability, rounded to 6 places
    expected = np.array([[dict(map(tuple, r["top"]))[c] for c in info.classes] for r in rows])
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5)
