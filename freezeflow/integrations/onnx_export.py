"""onnx_export: a trained model as an ONNX file, checked against PyTorch before it is written.

    export_onnx         torch.onnx.export with the torch.export-based exporter (dynamo=True: the TorchScript
                        exporter is deprecated since torch 2.9) of softmax(model(images)): input `images`,
                        float32 (N, 3, S, S) normalized as in training (preprocess.normalize_batch), N dynamic;
                        output `probabilities` (N, classes). One self-contained file (no external data).
                        Then `measure_parity` on real images; above the tolerance the export fails (one line).
    measure_parity      max abs diff between predict_images (PyTorch) and the served ONNX runtime
                        (onnx_runtime.onnx_probabilities) on the same uint8 images.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from freezeflow.core.data.prepare import Prepared
from freezeflow.core.data.preprocess import normalize_batch
from freezeflow.core.errors import UserError, first_line
from freezeflow.core.io import write_bytes_atomic
from freezeflow.core.models.io import ModelInfo, predict_images
from freezeflow.integrations.onnx_runtime import INPUT, OUTPUT, onnx_probabilities, require_onnx

PARITY_TOLERANCE = 1e-4  # max abs diff of probabilities an export may show against PyTorch
PARITY_IMAGES = 64  # val images the parity check runs on
CHUNK = 64  # images per onnxruntime call in the parity check


class ProbabilitiesNet(nn.Module):
    """softmax(model(x)), as predict_images computes it: the exported graph ends in probabilities."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) normalized -> (N, classes)
        return torch.softmax(self.model(x), dim=1)


def parity_pixels(prepared: Prepared, count: int = PARITY_IMAGES) -> np.ndarray:
    """uint8 (n, 3, S, S): the first `count` images of the val split (real images, not noise), at least 2."""
    rows = prepared.split["val"][:count]
    if len(rows) < 2:  # a batch of one would let torch.export fix the batch size at 1
        rows = np.resize(rows if len(rows) else np.arange(1), 2)
    return np.ascontiguousarray(prepared.images[rows])


def export_bytes(model: nn.Module, info: ModelInfo, pixels: np.ndarray, name: str) -> bytes:
    """The ONNX model as bytes (example: two of `pixels`; batch axis dynamic); UserError when it cannot export."""
    example = normalize_batch(np.ascontiguousarray(pixels[:2]), info.mean, info.std)  # (2, 3, S, S)
    batch = torch.export.Dim("batch", min=1, max=65_536)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress, step by step
            program = torch.onnx.export(ProbabilitiesNet(model).eval(), (example,), input_names=[INPUT],
                                        output_names=[OUTPUT], dynamic_shapes=({0: batch},), dynamo=True,
                                        external_data=False, optimize=True, verbose=False)
    except Exception as exc:  # noqa: BLE001 - torch.export and the ONNX translation raise many kinds
        raise UserError(f"{name}: cannot export to ONNX ({type(exc).__name__}: {first_line(exc)}); allowed: "
                        "serve.runtime: torch, which serves the model as it is") from None
    return program.model_proto.SerializeToString()


def measure_parity(model: nn.Module, info: ModelInfo, onnx_model: Path | str | bytes, pixels: np.ndarray) -> float:
    """Max abs diff of probabilities between PyTorch (predict_images) and onnxruntime on the same uint8 images."""
    run_onnx = onnx_probabilities(onnx_model, info)
    worst = 0.0
    for start in range(0, len(pixels), CHUNK):
        block = np.ascontiguousarray(pixels[start:start + CHUNK])
        expected = predict_images(model, info, torch.from_numpy(block)).numpy()
        worst = max(worst, float(np.abs(run_onnx(block) - expected).max()))
    return worst


def export_onnx(model: nn.Module, info: ModelInfo, pixels: np.ndarray, path: Path,
                tolerance: float = PARITY_TOLERANCE, name: str = "model") -> float:
    """Write `path` (an ONNX model with a dynamic batch axis) once it matches PyTorch on `pixels` (uint8
    (n, 3, S, S) real images) within `tolerance`; returns the max abs diff. UserError (one line naming `name`
    and the figure) when it cannot export or does not reach parity: then `path` is left as it was."""
    require_onnx()
    model = model.cpu().eval()
    data = export_bytes(model, info, pixels, name)
    parity = measure_parity(model, info, data, pixels)
    if not parity <= tolerance:  # NaN fails too
        raise UserError(f"{name}: the ONNX export does not reach parity with PyTorch: max abs diff of probabilities "
                        f"{parity:.3g} on {len(pixels)} val images > {tolerance:g}; allowed: serve.runtime: torch, "
                        "which serves the model as it is")
    write_bytes_atomic(path, data)
    return parity
