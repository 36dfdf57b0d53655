"""The model registry against a real sqlite MLflow store: register, promote or keep, load back safely."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pytest
import torch
from PIL import Image

from freezeflow.app.steps import register_step
from freezeflow.core.data.images import decode_rgb
from freezeflow.core.data.prepare import open_prepared
from freezeflow.core.data.preprocess import preprocess_images
from freezeflow.core.errors import UserError
from freezeflow.core.infer.evaluate import evaluate_model
from freezeflow.core.infer.predict import DEFAULT_MAX_PIXELS, predict_files
from freezeflow.core.layout import Layout
from freezeflow.core.models.io import load_model, predict_images
from freezeflow.core.params import load_params
from freezeflow.integrations.registry import (champion_info, decide_promotion, load_downloaded, load_registered,
                                              promote_or_keep, register_model, val_split_hash)
from freezeflow.integrations.tracking import tracked_training, tracking_scope
from tests.conftest import CLASSES, REPO, WritesMarker, draw_figure, write_figures_dataset
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
    root, params, result = tracked_project
    uri = store_uri(root)
    prepared = open_prepared(params, Layout(root))
    first = promote_or_keep(result["run_id"], "promoted", prepared, tracking_uri=uri)
    assert first["alias"] == "champion" and first["reason"] == "no champion yet"
    assert str(champion_info("promoted", uri)["version"]) == first["version"]
    # the same model again: both score the same on the same split, so it cannot beat the champion by 0.01
    second = promote_or_keep(result["run_id"], "promoted", prepared, margin=0.01, tracking_uri=uri)
    val = second["challenger_val_accuracy"]
    assert second["champion_val_accuracy"] == val and second["champion_version"] == first["version"]
    assert second["alias"] == "challenger" and second["version"] != first["version"]
    assert second["reason"] == decide_promotion(val, val, 0.01).reason
    assert "does not beat champion" in second["reason"]
    client = store(root)
    assert str(client.get_model_version_by_alias("promoted", "champion").version) == first["version"]
    challenger = client.get_model_version_by_alias("promoted", "challenger")
    assert str(challenger.version) == second["version"] and challenger.tags["decision"] == second["reason"]
    with pytest.raises(UserError, match="--alias: 'best' is not allowed; allowed: champion, challenger"):
        register_model(result["run_id"], "promoted", alias="best", tracking_uri=uri)


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
    """The MLflow model takes the files' bytes (base64) and says what predict says for the files, and
    its own forward is fed what preprocess_images makes of them."""
    import base64

    import mlflow.artifacts
    import mlflow.pyfunc
    import pandas as pd

    root, _, result = tracked_project
    model, info = load_registered(result["run_id"])
    files = sorted((root / "data" / "shapes").rglob("*.png"))[::7]
    local = mlflow.artifacts.download_artifacts(f"runs:/{result['run_id']}/model", tracking_uri=store_uri(root))
    served = mlflow.pyfunc.load_model(local)
    out = served.predict(pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode() for f in files]}))
    rows = predict_files(model, info, files)  # top-3 of 3 classes: every probability, rounded to 6 places
    assert out["top"].tolist() == [r["top"] for r in rows] and out["label"].tolist() == [r["label"] for r in rows]
    x = preprocess_images([decode_rgb(f, DEFAULT_MAX_PIXELS) for f in files], info.image_size, info.mean, info.std)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1).numpy()
    expected = np.array([[dict(map(tuple, r["top"]))[c] for c in info.classes] for r in rows])
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)


# ---- the champion gate: grown data, a new val split --------------------------------------------------

def add_figures(folder: Path, per_class: int, seed: int) -> None:
    """More images of every class (new files; the existing ones stay): the dataset grew."""
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        for i in range(per_class):
            Image.fromarray(draw_figure(kind, rng)).save(folder / kind / f"new{seed}_{i:02d}.png")


def write_other_classes(folder: Path, per_class: int = 12) -> Path:
    """circle and square as before, stripes removed, a new class `dots` (a grid of white points)."""
    rng = np.random.default_rng(5)
    for kind in ("circle", "square", "dots"):
        (folder / kind).mkdir(parents=True)
        for i in range(per_class):
            img = draw_figure(kind, rng) if kind != "dots" else rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            if kind == "dots":
                img[2::6, 2::6] = 255
            Image.fromarray(img).save(folder / kind / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def gate_project(tmp_path_factory):
    """Real runs in one sqlite store: `weak` (1 epoch at lr 1e-6: chance level) on the first data, `victim`
    (1 epoch) and `wide` (1 epoch at 40 px) on it too, then the data grows (a new val split) and `strong` (4 epochs) trains on it; `other`
    trains on a dataset whose class set changed. Their prepared data: old, new, other."""
    root = tmp_path_factory.mktemp("gate")
    data = write_figures_dataset(root / "data" / "figs")
    shutil.copytree(REPO / "params", root / "params", ignore=shutil.ignore_patterns("best.yaml"))
    (root / "store").mkdir()
    base = ["data.image_size=32", "train.backbone=resnet18", "train.weights=none", "train.batch_size=8",
            "train.schedule=constant"]

    def train(name: str, data_dir: Path, *sets: str):
        params = load_params(root / "params", [*base, f"data.dir={data_dir}", *sets])
        run_id = tracked_training(params, root, run_name=name)["run_id"]
        return run_id, open_prepared(params, Layout(root)), params

    with pytest.MonkeyPatch.context() as mp, tracking_scope(store_uri(root)):
        mp.setenv("MLFLOW_TRACKING_URI", store_uri(root))
        weak, old, _ = train("weak", data, "train.epochs=1", "train.lr=0.000001")
        victim, _, _ = train("victim", data, "train.epochs=1")
        wide, old_40, _ = train("wide", data, "train.epochs=1", "data.image_size=40")
        add_figures(data, 8, seed=1)
        strong, new, strong_params = train("strong", data, "train.epochs=4", "train.lr=0.01")
        other, other_prepared, _ = train("other", write_other_classes(root / "data" / "other"), "train.epochs=1")
        yield SimpleNamespace(root=root, uri=store_uri(root), weak=weak, victim=victim, wide=wide, strong=strong,
                              other=other, old=old, old_40=old_40, new=new, other_prepared=other_prepared,
                              strong_params=strong_params)


def val_files(prepared) -> set[str]:
    manifest = json.loads((prepared.root / "manifest.json").read_text())
    return {manifest["files"][i] for i in prepared.split["val"]}


def test_champion_is_rescored_on_the_challengers_val_split(gate_project):
    g = gate_project
    assert val_files(g.new) != val_files(g.old)  # the grown data has another val split
    first = promote_or_keep(g.weak, "gate", g.old, tracking_uri=g.uri)
    assert first["alias"] == "champion"
    kept = promote_or_keep(g.strong, "gate", g.new, margin=1.0, tracking_uri=g.uri)  # nothing beats by 1.0
    assert kept["alias"] == "challenger" and kept["reason"].endswith("by more than 1.0")

    champion = load_registered(f"models:/gate/{first['version']}", g.uri)
    fresh_val = evaluate_model(champion, g.new, "val")["accuracy"]
    fresh_test = evaluate_model(champion, g.new, "test")["accuracy"]
    challenger_val = evaluate_model(load_registered(g.strong, g.uri), g.new, "val")["accuracy"]
    client = store(g.root)
    run = client.get_run(g.strong)
    assert run.data.metrics["gate_champion_val_accuracy"] == pytest.approx(fresh_val, abs=1e-12)
    assert run.data.metrics["gate_champion_test_accuracy"] == pytest.approx(fresh_test, abs=1e-12)
    assert run.data.metrics["gate_challenger_val_accuracy"] == pytest.approx(challenger_val, abs=1e-12)
    assert run.data.tags["gate_val_split_hash"] == val_split_hash(g.new) != val_split_hash(g.old)
    assert run.data.tags["gate_decision"] == kept["reason"] and run.data.tags["gate_champion_version"] == "1"
    tags = client.get_model_version("gate", kept["version"]).tags
    assert tags["decision"] == kept["reason"] and tags["val_split_hash"] == val_split_hash(g.new)
    assert tags["champion_val_accuracy"] == f"{fresh_val:.6f}" and tags["champion_version"] == first["version"]
    assert f"champion {fresh_val:.4f} (re-scored on the same val split)" in kept["reason"]

    # the strong model against the chance-level champion, same split, no margin: promoted
    assert challenger_val > fresh_val
    promoted = promote_or_keep(g.strong, "gate", g.new, tracking_uri=g.uri)
    assert promoted["alias"] == "champion" and promoted["champion_val_accuracy"] == pytest.approx(fresh_val)
    assert promoted["reason"].startswith(f"val_accuracy {challenger_val:.4f} beats champion {fresh_val:.4f}")
    assert str(client.get_model_version_by_alias("gate", "champion").version) == promoted["version"]


def test_changed_class_set_is_kept_with_the_classes_named_and_force_promotes(gate_project):
    g = gate_project
    promote_or_keep(g.weak, "gate-classes", g.old, tracking_uri=g.uri)
    kept = promote_or_keep(g.other, "gate-classes", g.other_prepared, tracking_uri=g.uri)
    assert kept["alias"] == "challenger" and kept["champion_val_accuracy"] is None
    assert kept["reason"] == ("class set changed (added: dots; removed: stripes): no automatic promotion; "
                              "--force promotes")
    forced = promote_or_keep(g.other, "gate-classes", g.other_prepared, force=True, tracking_uri=g.uri)
    assert forced["alias"] == "champion" and forced["reason"] == f"forced ({kept['reason']})"
    client = store(g.root)
    assert str(client.get_model_version_by_alias("gate-classes", "champion").version) == forced["version"]
    assert client.get_model_version("gate-classes", forced["version"]).tags["decision"] == forced["reason"]


def test_champion_with_missing_artifacts_gives_a_one_line_reason(gate_project):
    g = gate_project
    first = promote_or_keep(g.victim, "gate-missing", g.old, tracking_uri=g.uri)
    client = store(g.root)
    model_id = client.get_run(g.victim).data.tags["model_id"]
    folder = Path(url2pathname(urlparse(client.get_logged_model(model_id).artifact_location).path))
    assert (folder / "artifacts" / "model.json").exists()
    shutil.rmtree(folder)  # someone deleted the champion's artifact folder
    kept = promote_or_keep(g.strong, "gate-missing", g.new, tracking_uri=g.uri)
    assert kept["alias"] == "challenger" and "\n" not in kept["reason"]
    assert kept["reason"].startswith(f"champion v{first['version']} cannot be re-scored (")
    assert kept["reason"].endswith("the new model stays challenger")
    assert str(client.get_model_version_by_alias("gate-missing", "champion").version) == first["version"]


def test_champion_of_another_image_size_is_scored_on_the_same_val_files_at_its_size(gate_project):
    g = gate_project
    first = promote_or_keep(g.wide, "figs", g.old_40, tracking_uri=g.uri)  # the dataset's name: register_step's
    # without a way to prepare the data at 40 px the champion cannot be scored: kept, one line
    kept = promote_or_keep(g.strong, "figs", g.new, tracking_uri=g.uri)
    assert kept["alias"] == "challenger" and "\n" not in kept["reason"]
    assert kept["reason"].startswith(f"champion v{first['version']} cannot be scored on this data (")
    # the step prepares the same files at the champion's size: the same val split, scored at 40 px
    result = register_step(g.strong_params, g.root, g.strong, margin=1.0)
    new_40 = open_prepared(replace(g.strong_params, data=replace(g.strong_params.data, image_size=40)),
                           Layout(g.root))
    champion = load_registered(f"models:/figs/{first['version']}", g.uri)
    assert result["champion_val_accuracy"] == pytest.approx(evaluate_model(champion, new_40, "val")["accuracy"])
    assert result["val_split_hash"] == val_split_hash(new_40) == val_split_hash(g.new)
    assert result["alias"] == "challenger" and result["reason"].endswith("by more than 1.0")


def test_every_training_run_logs_its_dataset_as_an_input(gate_project):
    g = gate_project
    inputs = store(g.root).get_run(g.strong).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset, tags = inputs[0].dataset, {t.key: t.value for t in inputs[0].tags}
    assert dataset.name == "figs" and dataset.digest == g.new.data_hash  # no DVC here: the content hash
    assert json.loads(dataset.source) == {"uri": str((g.root / "data" / "figs").resolve())}
    assert json.loads(dataset.profile) == {"images": 60, "classes": 3, **{k: len(v) for k, v in g.new.split.items()}}
    assert tags["mlflow.data.context"] == "training" and tags["val_images"] == str(len(g.new.split["val"]))
