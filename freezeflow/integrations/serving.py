"""serving: the registered MLflow model, a pyfunc over core.infer.serve (models-from-code: serving_model.py).

A batch of images in, one row per image out: label, probability, top ([[label, p], ...], the top_k best) and
error (None, or one line for a row that is not a usable image; the other rows are unaffected). Through
`mlflow models serve` (a string column `image` in the signature) every JSON form works and arrives here as a
DataFrame of base64 strings:
    {"inputs": {"image": ["<base64>", ...]}}   {"inputs": ["<base64>", ...]}   {"instances": [...]}
    {"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}   {"dataframe_records": [...]}
with "params": {"top_k": 5} beside it to override top_k. In-process, `mlflow.pyfunc.load_model(uri).predict`
takes a DataFrame whose `image` column holds base64 str, raw bytes or uint8 arrays (H, W[, C]) of any size;
the unwrapped model (`.unwrap_python_model().predict(None, x)`) also takes a list, {"inputs": ...}, or a
uint8 array (N, H, W, C) / (H, W, C).

The logged model's folder:
    MLmodel, serving_model.py     pyfunc flavor; the code file mlflow runs (`set_model(ServedModel())`)
    artifacts/model.json          backbone, classes, image_size, mean, std (core.models.io)
    artifacts/weights.npz         the state dict as plain arrays, read with allow_pickle=False
    artifacts/model.onnx          serve.runtime: onnx only (integrations.onnx_runtime: parity-checked)
    code/freezeflow/              the freezeflow package it was logged with: serving needs numpy, Pillow and
                                  pandas (pip_requirements), plus torch and torchvision for runtime torch, or
                                  onnxruntime alone for runtime onnx (torch is never imported then)
model_config: runtime, top_k, batch_size, max_pixels (params/serve.yaml when the model was logged).
"""

from __future__ import annotations

import base64
import contextlib
import io
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import PIL
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

import freezeflow
from freezeflow.core.infer.serve import ROW_KEYS, serve_items
from freezeflow.core.models.info import WEIGHTS_NPZ, read_info
from freezeflow.core.params import ServeParams

CODE_FILE = Path(__file__).with_name("serving_model.py")  # what mlflow runs: set_model(ServedModel())
ONNX_FILE = "model.onnx"
COLUMN = "image"  # the signature's one input column
ARTIFACTS = {"model_json": "model.json", "weights": WEIGHTS_NPZ, "onnx": ONNX_FILE}  # artifact name -> file


def serve_config(serve: ServeParams) -> dict:
    """The model_config the pyfunc reads at load time (what `mlflow models serve` passes too)."""
    return {"runtime": serve.runtime, "top_k": serve.top_k, "batch_size": serve.batch_size,
            "max_pixels": serve.max_pixels}


class ServedModel(PythonModel):
    """The pyfunc: rebuilds the StagedNet from weights.npz (runtime torch) or opens model.onnx (runtime onnx)."""

    def load_context(self, context) -> None:
        self.config = serve_config(ServeParams()) | dict(context.model_config or {})
        folder = Path(context.artifacts["model_json"]).parent  # model.json and weights.npz lie side by side
        if self.config["runtime"] == "onnx":
            from freezeflow.integrations.onnx_runtime import onnx_probabilities

            self.info = read_info(folder)
            self.probabilities = onnx_probabilities(context.artifacts["onnx"], self.info)
        else:
            from freezeflow.core.infer.predict import torch_probabilities
            from freezeflow.core.models.io import load_bundle

            model, self.info = load_bundle(folder)
            self.probabilities = torch_probabilities(model, self.info)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """One row per image (see the module docstring); a request's params.top_k overrides top_k. Called
        directly (unwrap_python_model), model_input may also be a list, a dict or a uint8 array."""
        top_k = int((params or {}).get("top_k") or self.config["top_k"])
        rows = serve_items(input_items(model_input), self.probabilities, list(self.info.classes),
                           self.info.image_size, top_k, int(self.config["max_pixels"]), int(self.config["batch_size"]))
        return pd.DataFrame(rows, columns=list(ROW_KEYS), dtype=object)  # object: an error row's None stays null


# ---- the input, whatever form it comes in -------------------------------------------------------------

def input_items(data: Any) -> list:
    """The images of a request, in order: each a base64 str, bytes or a uint8 array (core.infer.serve)."""
    if isinstance(data, pd.DataFrame):
        column = data[COLUMN] if COLUMN in data.columns else data.iloc[:, 0]
        return [item for cell in column.tolist() for item in cell_items(cell)]
    if isinstance(data, pd.Series):
        return [item for cell in data.tolist() for item in cell_items(cell)]
    if isinstance(data, dict):
        for key in ("inputs", "instances", COLUMN):
            if key in data:
                return input_items(data[key])
        raise ValueError(f"a dict input needs the key 'inputs' or {COLUMN!r}; got {sorted(data)}")
    return cell_items(data)


def cell_items(cell: Any) -> list:
    """One value as a list of images: a list or object array holds several; a uint8 array (N, H, W, C) is
    N images, (H, W[, C]) one; anything else is one item (an unusable one becomes that row's error)."""
    if isinstance(cell, (list, tuple)):
        return list(cell)
    if not isinstance(cell, np.ndarray):
        return [cell]
    if cell.dtype == object or cell.dtype.kind in "US":  # JSON lists parsed by MLflow: strings, not pixels
        return [item.item() if isinstance(item, np.generic) else item for item in cell.ravel()]
    return list(cell) if cell.ndim == 4 else [cell]


# ---- logging the model --------------------------------------------------------------------------------

def serving_signature(top_k: int) -> ModelSignature:
    """Input: a string column `image` (base64 of an image file's bytes); param top_k; the output's columns."""
    outputs = Schema([ColSpec("string", "label", required=False), ColSpec("double", "probability", required=False),
                      ColSpec(AnyType(), "top", required=False), ColSpec("string", "error", required=False)])
    return ModelSignature(inputs=Schema([ColSpec("string", COLUMN)]), outputs=outputs,
                          params=ParamSchema([ParamSpec("top_k", "long", top_k)]))


def example_input(pixels: np.ndarray) -> pd.DataFrame:
    """One real image as the served model receives it: a PNG of uint8 (3, S, S) pixels, base64-encoded."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).save(buffer, format="PNG")
    return pd.DataFrame({COLUMN: [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def pip_requirements(runtime: str) -> list[str]:
    """Given explicitly (MLflow's inference would load the model in a subprocess): what the bundle imports."""
    pins = [f"numpy=={np.__version__}", f"pillow=={PIL.__version__}", f"pandas=={pd.__version__}"]
    if runtime == "onnx":
        import onnxruntime

        return [*pins, f"onnxruntime=={onnxruntime.__version__}"]
    from importlib.metadata import version  # torchvision's import alone costs ~2 s (its ops load torch._dynamo)

    return [f"torch=={version('torch').split('+')[0]}", f"torchvision=={version('torchvision').split('+')[0]}", *pins]


def copy_package(dest: Path) -> Path:
    """dest/freezeflow: the installed package's sources (no caches), shipped as the model's code."""
    source = Path(freezeflow.__file__).resolve().parent
    shutil.copytree(source, dest / "freezeflow", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest / "freezeflow"


def model_arguments(bundle: Path, serve: ServeParams, example_pixels: np.ndarray, scratch: Path) -> dict:
    """Keyword arguments of mlflow.pyfunc.log_model / save_model for a bundle folder (save_bundle's, plus
    model.onnx for runtime onnx); `scratch` holds the code copy until MLflow has copied it."""
    artifacts = {name: str(bundle / file) for name, file in ARTIFACTS.items() if (bundle / file).exists()}
    if serve.runtime == "onnx" and "onnx" not in artifacts:
        raise FileNotFoundError(f"{bundle / ONNX_FILE}: serve.runtime onnx needs the exported model")
    return {"python_model": str(CODE_FILE), "artifacts": artifacts, "model_config": serve_config(serve),
            "signature": serving_signature(serve.top_k), "input_example": example_input(example_pixels),
            "pip_requirements": pip_requirements(serve.runtime), "code_paths": [str(copy_package(scratch))]}


@contextlib.contextmanager
def kept_sys_path() -> Iterator[None]:
    """MLflow checks the input example by loading the model, which puts its (temporary) code/ folder first on
    sys.path for good: a long-lived process (scheduled retraining) would collect one per logged model."""
    saved = list(sys.path)
    try:
        yield
    finally:
        sys.path[:] = saved


def log_serving_model(name: str, bundle: Path, serve: ServeParams, example_pixels: np.ndarray, scratch: Path):
    """Log the pyfunc under the active run as `name`; returns MLflow's ModelInfo."""
    with kept_sys_path():
        return mlflow.pyfunc.log_model(name=name, **model_arguments(bundle, serve, example_pixels, scratch))


def save_serving_model(path: Path, bundle: Path, serve: ServeParams, example_pixels: np.ndarray,
                       scratch: Path) -> Path:
    """The same pyfunc as a local folder (no tracking store): what `freezeflow bench serve` loads."""
    with kept_sys_path():
        mlflow.pyfunc.save_model(str(path), **model_arguments(bundle, serve, example_pixels, scratch))
    return path
