"""The bundled sample data: scikit-learn's digits written as byte-identical PNG files (`freezeflow data digits`).

An app module (it needs scikit-learn); the core reads the folder like any other ImageFolder.
The PNG encoder is hand-written so that `data.dvc`'s committed hash holds on every machine.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from freezeflow.core.io import write_bytes_atomic

STORED_BLOCK_MAX = 65535  # a stored deflate block holds at most 2**16 - 1 bytes


# --- PNG written by hand --------------------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    """length (4 bytes BE) + type + data + CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zlib_stored(raw: bytes) -> bytes:
    """A zlib stream of STORED (uncompressed) deflate blocks: the same bytes on every machine.

    zlib.compress output depends on the zlib build (zlib-ng, Intel, Apple ship different ones);
    stored blocks are fixed by RFC 1950/1951, and adler32 is plain arithmetic.
    """
    out = bytearray(b"\x78\x01")  # CMF: deflate, 32 KiB window; FLG: lowest level, (CMF*256+FLG) % 31 == 0
    starts = range(0, len(raw), STORED_BLOCK_MAX) if raw else [0]
    for start in starts:
        block = raw[start:start + STORED_BLOCK_MAX]
        final = start + STORED_BLOCK_MAX >= len(raw)
        # BFINAL bit, BTYPE=00 (stored), padded to the byte; then LEN and its one's complement NLEN
        out += bytes([1 if final else 0]) + struct.pack("<HH", len(block), len(block) ^ 0xFFFF) + block
    out += struct.pack(">I", zlib.adler32(raw))
    return bytes(out)


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W) uint8 grayscale -> PNG bytes, byte-identical on every machine (see zlib_stored)."""
    if pixels.ndim != 2 or pixels.dtype != np.uint8 or 0 in pixels.shape:
        raise ValueError(f"encode_png needs a non-empty (H, W) uint8 array, got {pixels.shape} "
                         f"{pixels.dtype}")
    height, width = pixels.shape
    # bit depth 8, color type 0 (grayscale), deflate, adaptive filtering, no interlace
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = np.ascontiguousarray(pixels)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))  # filter type 0 (None) per row
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib_stored(raw))
            + png_chunk(b"IEND", b""))


def write_digits(dest: Path) -> dict:
    """Write scikit-learn's bundled digits as dest/<label>/<index:04d>.png, 32x32 grayscale.

    Values 0..16 become v*255//16 and each pixel a 4x4 block (nearest upscale): lossless and exact.
    Files whose bytes are already right are skipped; nothing is ever deleted.
    """
    # scikit-learn only produces the default dataset (its digits ship inside the package, no
    # download); imported here so the rest of freezeflow never needs it.
    from sklearn.datasets import load_digits

    digits = load_digits()
    values = (digits.images.astype(np.int64) * 255 // 16).astype(np.uint8)  # (1797, 8, 8)
    block = np.ones((4, 4), dtype=np.uint8)
    dest = Path(dest)
    written = 0
    for index, (image, label) in enumerate(zip(values, digits.target)):
        path = dest / str(int(label)) / f"{index:04d}.png"
        data = encode_png(np.kron(image, block))  # (32, 32)
        if path.is_file() and path.read_bytes() == data:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
        written += 1
    return {"images": len(values), "classes": len(set(digits.target.tolist())), "written": written}
