"""evaluate_model and predict_files on a model trained (for one epoch) on real PNG files."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import CLASSES, write_figures_dataset
from freezeflow.core.errors import UserError
from freezeflow.core.data.images import decode_rgb
from freezeflow.core.data.prepare import prepare_dataset
from freezeflow.core.data.preprocess import normalize_batch, preprocess_images
from freezeflow.core.infer.evaluate import evaluate_model, predict_split_probabilities, write_eval
from freezeflow.core.infer.predict import DEFAULT_MAX_PIXELS, predict_files
from freezeflow.core.models.io import load_model
from freezeflow.core.params import load_params
from freezeflow.core.train.run import run_training

PARAMS = Path(__file__).resolve().parents[3] / "params"
def tiny_params(tmp: Path, data_dir: Path, *extra: str):
    shutil.copytree(PARAMS, tmp / "params", dirs_exist_ok=True)
    return load_params(tmp / "params", [f"data.dir={data_dir}", "data.image_size=32", "train.backbone=resnet18",
                                        "train.weights=none", "train.epochs=1", "train.batch_size=8", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data = write_figures_dataset(root / "data" / "shapes")
    params = tiny_params(root, data)
    run_training(params, root)
    return root, params, prepare_dataset(params.data, root / "prepared")


def test_evaluate_model_writes_a_complete_report(trained):
    root, _, prepared = trained
    report = evaluate_model(root / "models", prepared, "test")
    n_test = len(prepared.split["test"])
    assert report["split"] == "test" and report["n"] == n_test
    assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= report["macro_f1"] <= 1.0
    assert set(report["per_class"]) == set(CLASSES)
    assert {"precision", "recall"} <= set(report["per_class"]["circle"])
    assert np.asarray(report["confusion_matrix"]).sum() == n_test
    assert evaluate_model(load_model(root / "models"), prepared, "test") == report  # (model, info) works too
    write_eval(report, root / "reports" / "eval.json")
    assert json.loads((root / "reports" / "eval.json").read_text())["n"] == n_test


def test_evaluate_model_rejects_other_image_size_and_split(trained):
    root, _, prepared = trained
    other = replace(prepared, images=np.zeros((len(prepared.labels), 3, 40, 40), dtype=np.uint8))
    with pytest.raises(UserError, match="image_size"):
        evaluate_model(root / "models", other)
    with pytest.raises(UserError, match="split"):
        evaluate_model(root / "models", prepared, "holdout")


def test_predict_files_reports_bad_images_and_keeps_going(trained, tmp_path):
    root, _, _ = trained
    model, info = load_model(root / "models")
    good = root / "data" / "shapes" / "circle" / "00.png"
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:60])  # a PNG header, then nothing
    rows = predict_files(model, info, [corrupt, good])
    assert [r["file"] for r in rows] == [str(corrupt), str(good)]
    assert "error" in rows[0] and "\n" not in rows[0]["error"] and "label" not in rows[0]
    assert rows[1]["label"] in CLASSES and "error" not in rows[1]
    assert len(rows[1]["top"]) == 3 and rows[1]["top"][0] == [rows[1]["label"], rows[1]["probability"]]
    assert abs(sum(p for _, p in rows[1]["top"]) - 1.0) < 1e-3


def test_predict_files_expands_folders_and_skips_hidden_files(trained, tmp_path):
    root, _, _ = trained
    model, info = load_model(root / "models")
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(root / "data" / "shapes" / "square" / "01.png", folder / "a.png")
    (folder / ".DS_Store").write_bytes(b"\0" * 10)
    rows = predict_files(model, info, [folder, tmp_path / "missing.png"])
    assert [Path(r["file"]).name for r in rows] == ["a.png", "missing.png"]
    assert rows[0]["label"] in CLASSES
    assert "no such file" in rows[1]["error"]


def test_a_file_gets_the_same_probabilities_through_evaluate_predict_and_forward(trained):
    """One preprocessing path: the test split's files, fed through evaluate (prepared uint8 rows), predict
    (the files decoded again) and the model's own forward (preprocess_images), give the same probabilities."""
    root, _, prepared = trained
    model, info = load_model(root / "models")
    rows = prepared.split["test"]
    manifest = json.loads((prepared.root / "manifest.json").read_text())
    paths = [Path(manifest["dir"]) / manifest["files"][i] for i in rows]
    x = preprocess_images([decode_rgb(p, DEFAULT_MAX_PIXELS) for p in paths], info.image_size, info.mean, info.std)
    assert torch.equal(x, normalize_batch(np.ascontiguousarray(prepared.images[rows]), info.mean, info.std))
    with torch.no_grad():
        forward = torch.softmax(model(x), dim=1).numpy()  # (n, classes)
    evaluated = predict_split_probabilities(model, info, prepared, "test")
    np.testing.assert_allclose(evaluated, forward, rtol=0, atol=1e-6)
    predicted = predict_files(model, info, paths)  # top-3 of 3 classes: every probability, rounded to 6 places
    by_file = np.array([[dict(map(tuple, r["top"]))[c] for c in info.classes] for r in predicted])
    np.testing.assert_allclose(by_file, evaluated, rtol=0, atol=1e-6)
    assert [r["label"] for r in predicted] == [info.classes[i] for i in evaluated.argmax(1)]
