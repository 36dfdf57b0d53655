"""Decoding and checking image files.

`check_image` says whether a file is usable (and why not); `decode_rgb` turns any usable file into an
8-bit RGB image; `resize_square` makes the fixed-size array the model sees. A source is a path, the
file's bytes, or a binary file object (served images arrive as bytes): all three decode alike.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from freezeflow.core.errors import DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

# Litter from macOS, Windows and zip tools: never a class folder, never an image.
HIDDEN_NAMES = {"thumbs.db", "desktop.ini", "__macosx"}

Checked = tuple[Image.Image | None, str | None]  # (decoded image, None) or (None, reason code)
Source = Path | str | bytes | bytearray | memoryview | BinaryIO  # a file, its bytes, or an open binary file

REASONS = {
    "empty": "the file has zero bytes",
    "unreadable": "the file cannot be opened (permissions or I/O error)",
    "not_an_image": "not an image format Pillow can identify",
    "corrupt": "the image data is truncated or corrupt",
    "too_large": "more pixels than max_pixels (possible decompression bomb)",
    "too_small": "a side shorter than min_side",
}


def is_hidden(path: Path | str) -> bool:
    """True for dotfiles (.DS_Store, ._foo, .git) and OS litter (Thumbs.db, desktop.ini, __MACOSX)."""
    name = path.name if isinstance(path, Path) else os.path.basename(path)
    return name.startswith(".") or name.lower() in HIDDEN_NAMES


@contextlib.contextmanager
def strict_decoding() -> Iterator[None]:
    """Make truncated files raise while decoding, whatever another module set globally.

    With LOAD_TRUNCATED_IMAGES on, Pillow pads a cut-off file with gray and reports success, so a
    broken file would pass the check. Decompression-bomb warnings are silenced because our own
    max_pixels check (done on the header, before decoding) is the limit that counts.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def open_source(source: Source) -> BinaryIO | None:
    """An open binary file over `source`, or None when it holds zero bytes; OSError when a path cannot be
    read. A caller's file object is read into memory, so closing ours never closes theirs."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source) if memoryview(source).nbytes else None
    if hasattr(source, "read"):
        return open_source(source.read())
    size = Path(source).stat().st_size
    return open(source, "rb") if size else None  # noqa: SIM115 - closed by opened_image's with


def describe_source(source: Source | np.ndarray) -> str:
    """How an error names the source: the path, `<N bytes>`, `<binary file>` or `<array (H, W, C)>`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{memoryview(source).nbytes} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape}>"
    return "<binary file>" if hasattr(source, "read") else str(source)


@contextlib.contextmanager
def opened_image(source: Source, max_pixels: int, min_side: int) -> Iterator[Checked]:
    """Open and fully decode `source`; yields (image, None) when usable, else (None, reason code).

    The file stays open while the caller uses the image (EXIF and frames may be read lazily).
    """
    try:
        fh = open_source(source)
    except OSError:  # permissions, a folder, a dangling link, I/O error
        yield None, "unreadable"
        return
    if fh is None:
        yield None, "empty"
        return
    with fh, strict_decoding():
        img, reason = decode_checked(fh, max_pixels, min_side)
        try:
            yield img, reason
        finally:
            if img is not None:
                img.close()


def decode_checked(fh: BinaryIO, max_pixels: int, min_side: int) -> Checked:
    """Identify, size-check, then decode an open binary file; see REASONS for the codes."""
    try:
        img = Image.open(fh)
    except Image.DecompressionBombError:  # header over twice Pillow's own limit
        return None, "too_large"
    except UnidentifiedImageError:  # no plugin recognised the bytes
        return None, "not_an_image"
    except Exception:  # noqa: BLE001 - recognised, but the header is cut off ("Truncated File Read") or bad
        return None, "corrupt"
    width, height = img.size
    if width * height > max_pixels:  # from the header only: a bomb is never decoded
        img.close()
        return None, "too_large"
    try:
        img.load()
    except Image.DecompressionBombError:
        img.close()
        return None, "too_large"
    except Exception:  # noqa: BLE001 - Pillow plugins raise OSError, SyntaxError, ValueError, struct.error...
        img.close()
        return None, "corrupt"
    if min(width, height) < min_side:
        img.close()
        return None, "too_small"
    return img, None


def check_image(source: Source, max_pixels: int, min_side: int) -> str | None:
    """None if `source` is a usable image, else one of the codes in REASONS."""
    with opened_image(source, max_pixels, min_side) as (_, reason):
        return reason


def read_rgb(source: Source, max_pixels: int, min_side: int) -> tuple[Image.Image | None, str | None]:
    """Check and decode in one pass: (8-bit RGB image, upright per EXIF, None) or (None, reason code)."""
    with opened_image(source, max_pixels, min_side) as (img, reason):
        if img is None:
            return None, reason
        return to_rgb(ImageOps.exif_transpose(img)), None


def describe_reason(source: Source | np.ndarray, reason: str, max_pixels: int) -> str:
    """The one-line message for a reason code of read_rgb: `cannot use image <source>: <code>: <why>`."""
    limit = f" (max_pixels={max_pixels})" if reason == "too_large" else ""
    return f"cannot use image {describe_source(source)}: {reason}: {REASONS[reason]}{limit}"


def decode_rgb(source: Source, max_pixels: int) -> Image.Image:
    """Decode any usable image into an 8-bit RGB image, upright per its EXIF orientation.

    Raises DataError (one line naming the file) when the file is not usable.
    """
    img, reason = read_rgb(source, max_pixels, min_side=1)
    if img is None:
        raise DataError(describe_reason(source, reason, max_pixels))
    return img


def array_rgb(pixels: np.ndarray, max_pixels: int, min_side: int) -> tuple[Image.Image | None, str | None]:
    """Decoded uint8 pixels (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) as read_rgb gives a file: (RGB image,
    None) or (None, reason code), with the same size checks; alpha composited on white by to_rgb.
    ValueError for another dtype or shape."""
    channels = pixels.shape[2] if pixels.ndim == 3 else 1
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or channels not in (1, 3, 4):
        raise ValueError(f"an image array must be uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
                         f"got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    if width * height > max_pixels:
        return None, "too_large"
    if min(width, height) < min_side:
        return None, "too_small"
    squeezed = pixels[:, :, 0] if pixels.ndim == 3 and channels == 1 else pixels
    return to_rgb(Image.fromarray(np.ascontiguousarray(squeezed))), None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: alpha composited on white, 16-bit scaled (not clipped) to 8."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(scale_to_uint8(np.asarray(img), mode)).convert("RGB")
    if mode in ("P", "PA", "LA", "La", "RGBa"):
        # Palette transparency lives in img.info; RGBA makes it (and any alpha) an explicit channel.
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) 16/32-bit integer or float samples -> (H, W) uint8 with rounding.

    I;16* modes span 0..65535. Mode I (32-bit) is how some Pillow versions open 16-bit files: it is
    scaled from 0..65535 when any value exceeds 255, else taken as already 8-bit. Mode F is read
    as 0..1 when its maximum is at most 1, else as 0..255.
    """
    if mode == "F":
        floats = values.astype(np.float64)
        top = 1.0 if floats.size and np.nanmax(floats) <= 1.0 else 255.0
        return np.clip(np.rint(np.nan_to_num(floats) * (255.0 / top)), 0, 255).astype(np.uint8)
    ints = np.clip(values.astype(np.int64), 0, 65535)
    if mode == "I" and (ints.size == 0 or ints.max() <= 255):
        return ints.astype(np.uint8)
    return ((ints * 255 + 32767) // 65535).astype(np.uint8)  # round half up: 65535 -> 255, 32768 -> 128


def resize_square(img: Image.Image, size: int) -> np.ndarray:
    """RGB image -> (size, size, 3) uint8: shorter side resized to `size`, then center crop.

    Pillow's bilinear resize widens its filter when shrinking, so downscaling is antialiased.
    """
    if img.mode != "RGB":
        raise ValueError(f"resize_square needs an RGB image (use decode_rgb), got mode {img.mode}")
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resized = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    cropped = resized.crop((left, top, left + size, top + size))
    return np.array(cropped, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only
