"""serve: the served model's rows. Core only (no MLflow): the pyfunc in freezeflow.integrations.serving turns
its input (a DataFrame, JSON lists, arrays) into items and calls `serve_items`.

An item is one image: its file's bytes (JPEG, PNG, ... as the file holds them), the same bytes base64-encoded
as a str (JSON carries no bytes; a `data:image/...;base64,` prefix is allowed), or decoded uint8 pixels
(H, W), (H, W, 3) or (H, W, 4) of any size. Every item goes through preprocess.decode_pixels, the decode +
resize prepare stores for training and `freezeflow predict` runs, then the runtime's `probabilities`
(predict.torch_probabilities: normalize_batch + forward + softmax; or the ONNX runtime's) once per batch.
Each row is {label, probability, top: [[label, p], ...] (the k best), error: None}, or, for an item that is
not a usable image, {label: None, probability: None, top: None, error: one line}: one bad row never fails
the batch.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any

import numpy as np

from freezeflow.core.data.preprocess import ImageInput, read_pixels
from freezeflow.core.errors import DataError
from freezeflow.core.infer.predict import DEFAULT_MAX_PIXELS, TOP_K, Probabilities, label_batch

ROW_KEYS = ("label", "probability", "top", "error")  # every served row has exactly these, in this order
BATCH_SIZE = 64  # the default of serve.batch_size


def item_source(item: Any) -> ImageInput:
    """What decode_pixels reads for one item: bytes and uint8 arrays as they are, a str base64-decoded."""
    if isinstance(item, str):
        text = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item
        try:
            return base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise DataError(f"cannot use image <{len(item)}-character str>: not base64; allowed: the image "
                            "file's bytes base64-encoded") from None
    if isinstance(item, (bytes, bytearray, memoryview, np.ndarray)):
        return item
    raise DataError(f"cannot use image of type {type(item).__name__}; allowed: base64 str, bytes, or a uint8 "
                    "array (H, W), (H, W, 3), (H, W, 4)")


def serve_items(items: Sequence[Any], probabilities: Probabilities, classes: list[str], image_size: int,
                top_k: int = TOP_K, max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = BATCH_SIZE) -> list[dict]:
    """One row per item, in order (see the module docstring); the model runs once per `batch_size` items."""
    if top_k < 1:
        raise DataError(f"top_k: {top_k} is not allowed; allowed: >= 1")

    def load(item: Any) -> np.ndarray:  # uint8 (3, S, S)
        return read_pixels(item_source(item), image_size, max_pixels)

    rows: list[dict] = []
    for start in range(0, len(items), batch_size):
        rows += label_batch(items[start:start + batch_size], load, probabilities, classes, min(top_k, len(classes)))
    return [{key: row.get(key) for key in ROW_KEYS} for row in rows]
