"""preprocess: resize_pixels matches what prepare stores, normalize_batch is (x / 255 - mean) / std for arrays
and tensors alike, normalize_array (the torch-free ONNX runtime's) gives its very bits, preprocess_images
chains both, and bad inputs fail loudly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from freezeflow.core.data.images import resize_square
from freezeflow.core.data.preprocess import normalize_array, normalize_batch, preprocess_images, resize_pixels

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def random_image(rng: np.random.Generator, height: int = 40, width: int = 52) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)  # (H, W, 3)


def test_resize_pixels_is_channel_first_resize_square():
    array = random_image(np.random.default_rng(0))
    image = Image.fromarray(array)
    pixels = resize_pixels(image, 32)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, resize_square(image, 32).transpose(2, 0, 1))
    assert np.array_equal(resize_pixels(array, 32), pixels)  # an (H, W, 3) array is the same image


def test_normalize_batch_matches_the_formula_for_arrays_tuples_and_tensors():
    images = np.random.default_rng(1).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    mean, std = np.asarray(MEAN, np.float32).reshape(1, 3, 1, 1), np.asarray(STD, np.float32).reshape(1, 3, 1, 1)
    expected = (images.astype(np.float32) / 255.0 - mean) / std
    from_tuples = normalize_batch(images, MEAN, STD)
    assert from_tuples.dtype == torch.float32 and from_tuples.shape == (4, 3, 8, 8)
    np.testing.assert_allclose(from_tuples.numpy(), expected, rtol=0, atol=1e-6)
    from_tensors = normalize_batch(torch.from_numpy(images), torch.tensor(MEAN).view(1, 3, 1, 1),
                                   torch.tensor(STD).view(1, 3, 1, 1))  # what the training loop passes
    assert torch.equal(from_tensors, from_tuples)
    assert images.dtype == np.uint8 and images.max() > 1  # the input is untouched


@pytest.mark.parametrize("mean, std", [(MEAN, STD), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.0, 0.1, 1.0), (1.0, 0.3, 2.0))])
def test_normalize_array_gives_normalize_batch_bit_for_bit(mean, std):
    """Elementwise, so every (uint8 value, channel) pair checked is every input there can be."""
    every = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16), (2, 3, 16, 16)).copy()
    out = normalize_array(every, mean, std)
    assert out.dtype == np.float32 and out.shape == every.shape
    assert np.array_equal(out.view(np.uint32), normalize_batch(every, mean, std).numpy().view(np.uint32))
    with pytest.raises(TypeError, match="uint8"):
        normalize_array(every.astype(np.float32), mean, std)


def test_preprocess_images_is_resize_then_normalize():
    rng = np.random.default_rng(2)
    images = [Image.fromarray(random_image(rng)), random_image(rng, 64, 33)]
    x = preprocess_images(images, 32, MEAN, STD)
    assert x.shape == (2, 3, 32, 32)
    assert torch.equal(x, normalize_batch(np.stack([resize_pixels(i, 32) for i in images]), MEAN, STD))
    assert preprocess_images([], 32, MEAN, STD).shape == (0, 3, 32, 32)


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError, match="uint8"):
        normalize_batch(torch.zeros(1, 3, 4, 4), MEAN, STD)
    with pytest.raises(ValueError, match="uint8 \\(H, W, 3\\)"):
        resize_pixels(np.zeros((4, 4), dtype=np.uint8), 4)
