"""onnx_runtime: the runtime that serves a model's ONNX file, with no torch (onnx_export writes and checks it).

    onnx_probabilities  uint8 (N, 3, S, S) -> preprocess.normalize_array (normalize_batch's numbers, in numpy)
                        -> onnxruntime -> probabilities (N, classes)
    open_session        an onnxruntime CPU session, every graph optimization on
    require_onnx        one line naming what to install when onnx, onnxscript or onnxruntime is missing

A bundle with serve.runtime: onnx thus needs numpy, Pillow, onnxruntime and freezeflow's torch-free modules
(tested with torch made unimportable). onnxruntime is imported inside the functions, so that importing this
module costs nothing: `pip install 'freezeflow[serve]'` (pinned in requirements.lock).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from freezeflow.core.data.preprocess import normalize_array
from freezeflow.core.errors import UserError
from freezeflow.core.infer.predict import Probabilities
from freezeflow.core.models.info import ModelInfo

INPUT, OUTPUT = "images", "probabilities"  # the ONNX graph's names


def require_onnx() -> None:
    """One line naming what to install when the exporter or the runtime is missing."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if not module_exists(name)]
    if missing:
        raise UserError(f"ONNX needs {', '.join(missing)}: pip install 'freezeflow[serve]' (versions in "
                        "requirements.lock); allowed without it: serve.runtime: torch")


def module_exists(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def open_session(model: Path | str | bytes):
    """An onnxruntime CPU session over a file or the model's bytes, every graph optimization on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnx_probabilities(model: Path | str | bytes, info: ModelInfo) -> Probabilities:
    """The ONNX runtime: uint8 (N, 3, S, S) -> normalize_array (as in training) -> onnxruntime -> (N, classes)."""
    session = open_session(model)

    def probabilities(pixels: np.ndarray) -> np.ndarray:
        x = normalize_array(pixels, info.mean, info.std)  # float32 (N, 3, S, S)
        return session.run([OUTPUT], {INPUT: x})[0]

    return probabilities


