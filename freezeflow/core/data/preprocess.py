"""Preprocessing: the one path from an image to what a model's forward takes, shared by training
(prepare stores the resized arrays; the feature cache and the training loop normalize them), evaluation,
predict and the served MLflow model (core.infer.serve).

    file, bytes or uint8 array --decode_pixels--> uint8 (3, S, S)  decode (images.read_rgb) + resize_pixels
    decoded RGB image  --resize_pixels-->   uint8 (3, S, S)           shorter side to S, center crop
    uint8 (N, 3, S, S) --normalize_batch--> float32 (N, 3, S, S)      (x / 255 - mean) / std, a tensor
    uint8 (N, 3, S, S) --normalize_array--> float32 (N, 3, S, S)      the same numbers in numpy (no torch:
                                                                     the ONNX runtime's; tested bit for bit)
    decoded images     --preprocess_images--> float32 (N, 3, S, S)    both
mean and std are the backbone's (core.models.registry.normalization, saved in model.json).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from freezeflow.core.data.images import Source, array_rgb, describe_reason, read_rgb, resize_square
from freezeflow.core.errors import DataError

if TYPE_CHECKING:  # torch is imported where a tensor is made: decoding and normalize_array never need it
    import torch

Rgb = "Sequence[float] | torch.Tensor"
ImageInput = Source | np.ndarray  # a file, its bytes, an open binary file, or decoded uint8 pixels (H, W[, C])


def decode_pixels(source: ImageInput, size: int, max_pixels: int,
                  min_side: int = 1) -> tuple[np.ndarray | None, str | None]:
    """One image -> (uint8 (3, size, size), None) or (None, reason code of images.REASONS): what prepare
    stores for a file, and what predict, evaluate and the served model feed normalize_batch.
    ValueError for an array of another dtype or shape (images.array_rgb)."""
    if isinstance(source, np.ndarray):
        image, reason = array_rgb(source, max_pixels, min_side)
    else:
        image, reason = read_rgb(source, max_pixels, min_side)
    if image is None:
        return None, reason
    return resize_pixels(image, size), None


def read_pixels(source: ImageInput, size: int, max_pixels: int) -> np.ndarray:
    """decode_pixels for one image that must be usable: DataError (one line naming it) when it is not."""
    pixels, reason = decode_pixels(source, size, max_pixels)
    if pixels is None:
        raise DataError(describe_reason(source, reason, max_pixels))
    return pixels


def resize_pixels(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """One decoded RGB image (PIL, or uint8 (H, W, 3)) -> uint8 (3, size, size), channel-first like prepare's."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"resize_pixels needs a uint8 (H, W, 3) array, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    return resize_square(image, size).transpose(2, 0, 1)


def normalize_batch(images: torch.Tensor | np.ndarray, mean: Rgb, std: Rgb) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float32 (N, 3, S, S) on the images' device, normalized as the weights expect.

    mean/std: 3 numbers, or tensors already shaped (1, 3, 1, 1) on that device (the training loop's).
    """
    import torch

    x = torch.as_tensor(images)  # numpy: shares memory, nothing is copied yet
    if x.dtype != torch.uint8:  # the in-place divide below must never touch a caller's float tensor
        raise TypeError(f"normalize_batch needs uint8 images, got {x.dtype}")
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x.float().div_(255.0) - mean) / std


def normalize_array(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """normalize_batch without torch: uint8 (N, 3, S, S) -> float32 (N, 3, S, S), the same float32 operations in
    the same order, so the same bits (every uint8 value x channel is checked against normalize_batch)."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise TypeError(f"normalize_array needs uint8 images, got {x.dtype}")
    mean = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return (x.astype(np.float32) / np.float32(255.0) - mean) / std


def preprocess_images(images: Sequence[Image.Image | np.ndarray], size: int, mean: Rgb, std: Rgb) -> torch.Tensor:
    """Decoded RGB images -> float32 (N, 3, size, size): what a model's forward (and the logged MLflow model) takes."""
    if not images:
        import torch

        return torch.empty(0, 3, size, size)
    return normalize_batch(np.stack([resize_pixels(image, size) for image in images]), mean, std)
