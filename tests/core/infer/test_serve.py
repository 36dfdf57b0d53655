"""serve_items (the served model's rows, core only) and the pickle-free bundle, on a model trained for one epoch
on real JPEG files: one decode + resize + normalize for prepare, predict, evaluate and serving."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from freezeflow.core.data.images import decode_rgb
from freezeflow.core.data.pixels import decode_file
from freezeflow.core.data.prepare import prepare_dataset
from freezeflow.core.data.preprocess import decode_pixels
from freezeflow.core.errors import DataError, UserError
from freezeflow.core.infer.evaluate import predict_split_probabilities
from freezeflow.core.infer.predict import DEFAULT_MAX_PIXELS, predict_files, torch_probabilities
from freezeflow.core.infer.serve import ROW_KEYS, serve_items
from freezeflow.core.models.io import WEIGHTS_NPZ, load_bundle, load_model, predict_images, save_bundle
from freezeflow.core.params import load_params
from freezeflow.core.train.run import run_training
from tests.conftest import CLASSES, REPO, WritesMarker, write_figures_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, model, info, prepared, jpeg files of the test split)."""
    root = tmp_path_factory.mktemp("serve")
    data = write_figures_dataset(root / "data" / "figures", suffix=".jpg")
    shutil.copytree(REPO / "params", root / "params", ignore=shutil.ignore_patterns("best.yaml"))
    params = load_params(root / "params", [f"data.dir={data}", "data.image_size=32", "train.backbone=resnet18",
                                           "train.weights=none", "train.epochs=1", "train.batch_size=8"])
    run_training(params, root)
    prepared = prepare_dataset(params.data, root / "prepared")
    model, info = load_model(root / "models")
    manifest = json.loads((prepared.root / "manifest.json").read_text())
    files = [Path(manifest["dir"]) / manifest["files"][i] for i in prepared.split["test"]]
    return root, model, info, prepared, files


def probabilities_of(rows: list[dict], classes: list[str]) -> np.ndarray:
    """Every class's probability from rows whose `top` lists all classes (3 classes, top_k 3)."""
    return np.array([[dict(map(tuple, r["top"]))[c] for c in classes] for r in rows])


def test_decode_pixels_is_what_prepare_stores_for_a_file_its_bytes_and_an_open_file(trained):
    root, _, _, prepared, files = trained
    params = load_params(root / "params", [f"data.dir={files[0].parents[1]}", "data.image_size=32"])
    stored, _ = decode_file(files[0], params.data)
    for source in (files[0], str(files[0]), files[0].read_bytes(), io.BytesIO(files[0].read_bytes())):
        pixels, reason = decode_pixels(source, 32, DEFAULT_MAX_PIXELS)
        assert reason is None and np.array_equal(pixels, stored)
    row = prepared.split["test"][0]
    assert np.array_equal(prepared.images[row], stored)  # the prepared row of that same file


def test_a_jpeg_gets_the_same_probabilities_through_prepare_predict_evaluate_and_serve(trained):
    _, model, info, prepared, files = trained
    classes = list(info.classes)
    rows = prepared.split["test"]
    from_prepared = predict_images(model, info, torch.from_numpy(np.ascontiguousarray(prepared.images[rows])))
    evaluated = predict_split_probabilities(model, info, prepared, "test")
    predicted = probabilities_of(predict_files(model, info, files), classes)
    served_rows = serve_items([f.read_bytes() for f in files], torch_probabilities(model, info), classes, 32)
    served = probabilities_of(served_rows, classes)
    np.testing.assert_allclose(evaluated, from_prepared.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(predicted, evaluated, rtol=0, atol=1e-6)  # rounded to 6 places
    np.testing.assert_array_equal(served, predicted)  # the same rows, the same rounding
    assert [r["label"] for r in served_rows] == [classes[i] for i in evaluated.argmax(1)]


def test_bytes_base64_a_data_url_and_decoded_arrays_give_the_same_rows(trained):
    _, model, info, _, files = trained
    raw = files[0].read_bytes()
    text = base64.b64encode(raw).decode()
    items = [raw, bytearray(raw), text, f"data:image/jpeg;base64,{text}", np.asarray(decode_rgb(files[0], 10**8))]
    rows = serve_items(items, torch_probabilities(model, info), list(info.classes), 32)
    assert all(list(r) == list(ROW_KEYS) and r["error"] is None for r in rows)
    assert all(r == rows[0] for r in rows), rows


def test_a_bad_row_gets_a_one_line_error_and_never_fails_the_batch(trained):
    _, model, info, _, files = trained
    good = files[0].read_bytes()
    bad = [b"not an image", good[: len(good) // 2], b"", "%%% not base64 %%%", None, np.zeros((8, 8), np.float32)]
    rows = serve_items([good, *bad, good], torch_probabilities(model, info), list(info.classes), 32)
    assert rows[0]["label"] in CLASSES and rows[0] == rows[-1]
    errors = [r["error"] for r in rows[1:-1]]
    assert all(e and "\n" not in e for e in errors) and all(r["label"] is None and r["top"] is None
                                                              for r in rows[1:-1])
    assert "not_an_image" in errors[0] and "corrupt" in errors[1] and "empty" in errors[2]
    assert "not base64" in errors[3] and "NoneType" in errors[4] and "uint8" in errors[5]


def test_uint8_arrays_of_any_size_and_channels_decode_as_their_png_would(trained):
    _, model, info, _, _ = trained
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((17, 40, 3), (300, 200), (64, 64, 4),
                                                                         (33, 33, 1))]
    pngs = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array[:, :, 0] if array.shape[-1:] == (1,) else array).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    run = torch_probabilities(model, info)
    assert serve_items(arrays, run, list(info.classes), 32) == serve_items(pngs, run, list(info.classes), 32)
    too_big = serve_items([np.zeros((100, 100, 3), np.uint8)], run, list(info.classes), 32, max_pixels=5000)
    assert "too_large" in too_big[0]["error"]


def test_top_k_and_batches(trained):
    _, model, info, _, files = trained
    run, classes = torch_probabilities(model, info), list(info.classes)
    items = [f.read_bytes() for f in files]
    one = serve_items(items, run, classes, 32, top_k=1, batch_size=2)
    assert all(len(r["top"]) == 1 and r["top"][0] == [r["label"], r["probability"]] for r in one)
    assert [r["label"] for r in one] == [r["label"] for r in serve_items(items, run, classes, 32)]
    assert all(len(r["top"]) == 3 for r in serve_items(items[:1], run, classes, 32, top_k=10))  # 3 classes
    with pytest.raises(DataError, match="top_k"):
        serve_items(items, run, classes, 32, top_k=0)


def test_bundle_weights_round_trip_without_pickle_and_an_object_array_is_refused(trained, tmp_path):
    _, model, info, _, _ = trained
    folder = save_bundle(model, info, tmp_path / "bundle")
    loaded, same_info = load_bundle(folder)
    assert same_info == info
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    marker = tmp_path / "code-ran"
    np.savez(folder / WEIGHTS_NPZ, x=np.array([WritesMarker(marker)], dtype=object))  # needs pickle to load
    with pytest.raises(UserError, match="refused to load"):
        load_bundle(folder)
    assert not marker.exists()
