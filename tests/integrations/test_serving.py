"""The registered MLflow model (integrations.serving) against a real sqlite store, on real JPEG files: the same
probabilities as training's prepared rows, `freezeflow predict` and evaluate; bad rows; uint8 arrays; the ONNX
runtime, `freezeflow export --format onnx` and its parity check; `mlflow models serve` for real."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow.artifacts
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from freezeflow.core.data.prepare import open_prepared
from freezeflow.core.errors import UserError
from freezeflow.core.infer.evaluate import predict_split_probabilities
from freezeflow.core.infer.predict import predict_files
from freezeflow.core.layout import Layout
from freezeflow.core.models.io import ModelInfo, load_model, predict_images
from freezeflow.core.models.staged import StagedNet
from freezeflow.core.params import load_params
from freezeflow.integrations.onnx_export import PARITY_TOLERANCE, export_onnx, parity_pixels
from freezeflow.integrations.onnx_runtime import onnx_probabilities, open_session
from freezeflow.integrations.registry import load_registered, register_model
from freezeflow.integrations.tracking import tracked_training, tracking_scope
from tests.conftest import BIN, CLASSES, REPO, free_port, write_figures_dataset


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two tracked 1-epoch trainings on JPEG figures in one sqlite store: `served` (serve.runtime torch) and
    `served-onnx` (runtime onnx), each registered as its name's champion; the test split's files."""
    root = tmp_path_factory.mktemp("serving")
    data = write_figures_dataset(root / "data" / "figures", suffix=".jpg")
    shutil.copytree(REPO / "params", root / "params", ignore=shutil.ignore_patterns("best.yaml"))
    (root / "store").mkdir()
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    sets = [f"data.dir={data}", "data.image_size=32", "train.backbone=resnet18", "train.weights=none",
            "train.epochs=1", "train.batch_size=8"]
    with pytest.MonkeyPatch.context() as mp, tracking_scope(uri):
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        params = load_params(root / "params", sets)
        torch_run = tracked_training(params, root, run_name="torch")["run_id"]
        register_model(torch_run, "served", "champion", uri)
        model, info = load_model(root / "models")  # the torch run's model: models/ holds the latest training
        onnx_params = load_params(root / "params", [*sets, "serve.runtime=onnx", "train.seed=1"])
        onnx_run = tracked_training(onnx_params, root, run_name="onnx")["run_id"]
        register_model(onnx_run, "served-onnx", "champion", uri)
        prepared = open_prepared(params, Layout(root))
        manifest = json.loads((prepared.root / "manifest.json").read_text())
        files = [Path(manifest["dir"]) / manifest["files"][i] for i in prepared.split["test"]]
        yield SimpleNamespace(root=root, uri=uri, data=data, torch_run=torch_run, onnx_run=onnx_run, model=model,
                              info=info, prepared=prepared, files=files)


def load_pyfunc(uri: str):
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(uri)


def probabilities_of(tops: list, classes: list[str]) -> np.ndarray:
    return np.array([[dict(map(tuple, top))[c] for c in classes] for top in tops])


def test_the_registered_model_gives_the_probabilities_of_prepare_predict_and_evaluate(served):
    """One preprocessing path, four callers, one JPEG file each: training's prepared uint8 row, `freezeflow
    predict` (predict_files), evaluate and the champion pyfunc (its bytes, base64) agree."""
    s, classes = served, list(served.info.classes)
    rows = s.prepared.split["test"]
    prepared_probs = predict_images(s.model, s.info, torch.from_numpy(np.ascontiguousarray(s.prepared.images[rows])))
    evaluated = predict_split_probabilities(s.model, s.info, s.prepared, "test")
    predicted = predict_files(s.model, s.info, s.files)
    images = pd.DataFrame({"image": [b64(f.read_bytes()) for f in s.files]})
    out = load_pyfunc("models:/served@champion").predict(images)
    assert out["top"].tolist() == [r["top"] for r in predicted]  # the same rows, exactly
    assert out["label"].tolist() == [r["label"] for r in predicted] == [classes[i] for i in evaluated.argmax(1)]
    served_probs = probabilities_of(out["top"].tolist(), classes)  # 3 classes, top_k 3: every probability
    np.testing.assert_allclose(served_probs, evaluated, rtol=0, atol=1e-6)  # rounded to 6 places
    np.testing.assert_allclose(evaluated, prepared_probs.numpy(), rtol=0, atol=1e-6)
    run = MlflowClient(s.uri).get_run(s.torch_run)
    assert run.data.tags["model_format"] == "pyfunc-npz" and "onnx_parity_max_abs_diff" not in run.data.metrics


def test_a_bad_row_never_fails_the_batch_and_arrays_of_any_size_work(served):
    s = served
    good = s.files[0].read_bytes()
    arrays = [np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8) for shape in ((20, 50, 3), (90, 70))]
    model = load_pyfunc("models:/served@champion")
    out = model.predict(pd.DataFrame({"image": [b64(good), b64(b"GIF89a garbage"), good, *arrays]}),
                        params={"top_k": 1})
    assert out.loc[1, "label"] is None and out.loc[1, "top"] is None and "not_an_image" in out.loc[1, "error"]
    assert out.loc[0, "error"] is None and out.loc[0, "label"] in CLASSES and len(out.loc[0, "top"]) == 1
    assert out.loc[2].tolist() == out.loc[0].tolist()  # raw bytes and base64 of them: the same row
    assert out.loc[3:, "error"].isna().all() and set(out.loc[3:, "label"]) <= set(CLASSES)
    inner = model.unwrap_python_model()  # called directly: lists, {"inputs": ...} and (N, H, W, C) arrays too
    batch = np.stack([arrays[0], arrays[0]])  # (2, 20, 50, 3)
    for value in (batch, [arrays[0], arrays[0]], {"inputs": {"image": [arrays[0], arrays[0]]}}):
        direct = inner.predict(None, value)
        assert direct["label"].tolist() == [out.loc[3, "label"]] * 2 and direct["error"].isna().all()
    assert inner.predict(None, arrays[0])["label"].tolist() == [out.loc[3, "label"]]  # one (H, W, C) image


def test_serve_runtime_onnx_logs_a_parity_checked_model_that_serves_on_onnxruntime(served):
    s = served
    client = MlflowClient(s.uri)
    run = client.get_run(s.onnx_run)
    assert run.data.tags["model_format"] == "pyfunc-onnx"
    assert 0 <= run.data.metrics["onnx_parity_max_abs_diff"] < PARITY_TOLERANCE
    bundle = {Path(a.path).name for a in client.list_artifacts(s.onnx_run, "model/artifacts")}
    assert bundle == {"model.json", "weights.npz", "model.onnx"}
    served_onnx = load_pyfunc("models:/served-onnx@champion")
    assert served_onnx.unwrap_python_model().config["runtime"] == "onnx"
    out = served_onnx.predict(pd.DataFrame({"image": [b64(f.read_bytes()) for f in s.files]}))
    model, info = load_registered("models:/served-onnx@champion", s.uri)  # the same run's torch weights
    expected = probabilities_of([r["top"] for r in predict_files(model, info, s.files)], list(info.classes))
    np.testing.assert_allclose(probabilities_of(out["top"].tolist(), list(info.classes)), expected, rtol=0,
                               atol=PARITY_TOLERANCE)


NO_TORCH = """
import json, sys
sys.modules["torch"] = sys.modules["torchvision"] = None  # any import of them now raises ImportError
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model("models:/served-onnx@champion")
out = model.predict(pd.DataFrame({"image": json.loads(sys.stdin.read())}))
print(json.dumps({"top": out["top"].tolist(), "error": out["error"].tolist(), "torch": sys.modules["torch"] is None}))
"""


def test_an_onnx_bundle_serves_without_torch(served):
    """serve.runtime onnx needs onnxruntime, numpy, Pillow and pandas only: a process where torch cannot be
    imported loads the champion and gives the torch model's probabilities; its requirements name no torch."""
    s = served
    files = [b64(f.read_bytes()) for f in s.files] + [b64(b"not an image")]
    proc = subprocess.run([sys.executable, "-c", NO_TORCH], input=json.dumps(files), capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": s.uri}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch"] and out["error"][:-1] == [None] * len(s.files) and "not_an_image" in out["error"][-1]
    model, info = load_registered("models:/served-onnx@champion", s.uri)
    expected = probabilities_of([r["top"] for r in predict_files(model, info, s.files)], list(info.classes))
    np.testing.assert_allclose(probabilities_of(out["top"][:-1], list(info.classes)), expected, rtol=0,
                               atol=PARITY_TOLERANCE)
    requirements = Path(mlflow.artifacts.download_artifacts(f"runs:/{s.onnx_run}/model/requirements.txt",
                                                            tracking_uri=s.uri)).read_text()
    assert "onnxruntime==" in requirements and "torch" not in requirements


def test_freezeflow_export_writes_an_onnx_file_with_a_dynamic_batch_and_logs_parity(served):
    import onnx

    s = served
    env = {**os.environ, "MLFLOW_TRACKING_URI": s.uri}
    cmd = [str(BIN / "freezeflow"), "export", "--format", "onnx", "--model", "models:/served@champion",
           "-S", f"data.dir={s.data}", "-S", "data.image_size=32"]
    done = subprocess.run(cmd, cwd=s.root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    path = s.root / "exports" / "model.onnx"
    line = done.stderr.splitlines()[-1]  # after MLflow's download progress
    assert line.startswith("exports/model.onnx: max abs diff of probabilities vs PyTorch ")
    assert line.endswith(f"val images; logged to MLflow run {s.torch_run} (onnx/, onnx_parity_max_abs_diff)")
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    assert open_session(path).get_inputs()[0].name == "images"
    run_onnx, pixels = onnx_probabilities(path, s.info), parity_pixels(s.prepared)
    for n in (1, 64):  # any batch size runs
        assert run_onnx(np.repeat(pixels[:1], n, axis=0)).shape == (n, 3)
    run = MlflowClient(s.uri).get_run(s.torch_run)
    assert 0 <= run.data.metrics["onnx_parity_max_abs_diff"] < PARITY_TOLERANCE
    assert [a.path for a in MlflowClient(s.uri).list_artifacts(s.torch_run, "onnx")] == ["onnx/model.onnx"]


class NoisyHead(nn.Module):
    """A head whose output depends on a random draw: PyTorch's and onnxruntime's generators differ."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # (N, 3)
        return x + 10 * torch.rand_like(x)


class DataDependentHead(nn.Module):
    """A branch on a tensor's value: torch.export cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if x.sum() > 0 else -x


def staged(head: nn.Module) -> StagedNet:
    return StagedNet("noisy", [nn.Conv2d(3, 3, 1), head], ["stem", "head"], 3).eval()


def test_an_export_that_misses_parity_or_cannot_export_fails_with_one_line(served, tmp_path):
    info = ModelInfo("noisy", list(CLASSES), 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    pixels = parity_pixels(served.prepared)
    with pytest.raises(UserError) as missed:
        export_onnx(staged(NoisyHead()), info, pixels, tmp_path / "noisy.onnx", name="models:/noisy@champion")
    message = str(missed.value)
    assert "\n" not in message and message.startswith("models:/noisy@champion: the ONNX export does not reach parity")
    assert "max abs diff of probabilities" in message and f"> {PARITY_TOLERANCE:g}" in message
    assert not (tmp_path / "noisy.onnx").exists()
    with pytest.raises(UserError, match=r"^branchy: cannot export to ONNX \(") as failed:
        export_onnx(staged(DataDependentHead()), info, pixels, tmp_path / "branchy.onnx", name="branchy")
    assert "\n" not in str(failed.value) and not (tmp_path / "branchy.onnx").exists()


def test_export_with_an_unknown_format_is_one_line(tmp_path):
    done = subprocess.run([str(BIN / "freezeflow"), "export", "--format", "tflite"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == "error: --format: 'tflite' is not allowed; allowed: onnx\n"


# ---- mlflow models serve, for real ---------------------------------------------------------------------

def wait_until_up(port: int, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    raise AssertionError(f"mlflow models serve did not answer /ping within {timeout} s")


def post(port: int, body: dict) -> list[dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["predictions"]


@pytest.mark.slow
def test_mlflow_models_serve_answers_two_jpegs_and_a_corrupt_file(served, tmp_path):
    """15 s on a quiet 2-core machine, minutes under load (the server's start): marked slow."""
    s = served
    jpegs = [s.files[0], s.files[-1]]
    corrupt = jpegs[0].read_bytes()[:200]  # a JPEG cut off after its header
    images = [b64(f.read_bytes()) for f in jpegs] + [b64(corrupt)]
    expected = predict_files(*load_registered("models:/served@champion", s.uri), jpegs)
    port = free_port()
    # mlflow execs `uvicorn` by name: the venv's bin must be on PATH, as it is once the venv is activated
    env = {**os.environ, "MLFLOW_TRACKING_URI": s.uri, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    log_path = tmp_path / "serve.log"
    log = log_path.open("w")
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/served@champion", "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(port, proc, log_path)
        for body in ({"inputs": {"image": images}}, {"inputs": images},
                     {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}):
            rows = post(port, body)
            assert [r["label"] for r in rows[:2]] == [e["label"] for e in expected]
            assert [r["probability"] for r in rows[:2]] == [e["probability"] for e in expected]
            assert [r["top"] for r in rows[:2]] == [e["top"] for e in expected] and rows[0]["error"] is None
            assert rows[2]["label"] is None and rows[2]["top"] is None and "corrupt" in rows[2]["error"]
        one = post(port, {"inputs": {"image": images[:1]}, "params": {"top_k": 1}})
        assert one == [{"label": expected[0]["label"], "probability": expected[0]["probability"],
                        "top": expected[0]["top"][:1], "error": None}]
    finally:
        stop_group(proc)
        log.close()


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group the test started (the server and its uvicorn worker), SIGKILL after 30 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # every process of the group has exited
            return
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue
