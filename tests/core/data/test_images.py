"""freezeflow.core.data.images on real files written with Pillow into tmp_path (no mocks)."""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from freezeflow.core.errors import DataError
from freezeflow.core.data.images import check_image, decode_rgb, is_hidden, resize_square

BIG = 10_000_000  # max_pixels that every fixture image is under


def save(path: Path, img: Image.Image, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def noise(shape: tuple, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def mode_of(path: Path) -> str:
    with Image.open(path) as img:
        return img.mode


def truncated(path: Path) -> Path:
    """Cut a valid file to half its bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def forged_png(path: Path, width: int, height: int) -> Path:
    """A 1x1 grayscale PNG whose IHDR claims width x height (CRC fixed so the header parses)."""
    raw = zlib.compress(b"\x00\x00")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


# --- good files decode to RGB uint8 ----------------------------------------------------------------

def test_rgb_png_decodes_exactly(tmp_path):
    pixels = noise((20, 30, 3))
    img = decode_rgb(save(tmp_path / "a.png", Image.fromarray(pixels)), BIG)
    assert img.mode == "RGB" and img.size == (30, 20)
    assert np.array_equal(np.asarray(img), pixels)


def test_rgb_jpeg_decodes(tmp_path):
    path = save(tmp_path / "a.jpg", Image.new("RGB", (30, 20), (200, 40, 10)), quality=95)
    assert check_image(path, BIG, 16) is None
    arr = np.asarray(decode_rgb(path, BIG))
    assert arr.shape == (20, 30, 3) and arr.dtype == np.uint8
    assert np.abs(arr.astype(int) - [200, 40, 10]).max() <= 3  # JPEG is lossy


def test_grayscale_becomes_three_equal_channels(tmp_path):
    pixels = noise((16, 17))
    arr = np.asarray(decode_rgb(save(tmp_path / "g.png", Image.fromarray(pixels, "L")), BIG))
    assert arr.shape == (16, 17, 3)
    assert all(np.array_equal(arr[..., c], pixels) for c in range(3))


def test_palette_with_transparency_composites_on_white(tmp_path):
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    img.paste(1, (0, 0, 8, 16))  # left half opaque green-ish, right half transparent index 0
    path = save(tmp_path / "p.png", img, transparency=0)
    assert mode_of(path) == "P"
    arr = np.asarray(decode_rgb(path, BIG))
    assert arr.shape == (16, 16, 3)
    assert tuple(arr[0, 0]) == (10, 200, 30)
    assert tuple(arr[0, 15]) == (255, 255, 255)


def test_rgba_and_la_composite_on_white(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (255, 0, 0, 255)  # opaque red
    rgba[:, 8:] = (255, 0, 0, 0)  # fully transparent red
    rgba[0, 0] = (0, 0, 0, 128)  # half-transparent black
    arr = np.asarray(decode_rgb(save(tmp_path / "a.png", Image.fromarray(rgba, "RGBA")), BIG))
    assert tuple(arr[1, 1]) == (255, 0, 0)
    assert tuple(arr[1, 12]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in arr[0, 0])
    la = Image.merge("LA", [Image.new("L", (16, 16), 0), Image.new("L", (16, 16), 0)])
    assert tuple(np.asarray(decode_rgb(save(tmp_path / "la.png", la), BIG))[3, 3]) == (255, 255, 255)


def test_cmyk_jpeg_decodes_to_rgb(tmp_path):
    path = save(tmp_path / "c.jpg", Image.new("CMYK", (20, 16), (0, 255, 255, 0)), quality=95)
    assert mode_of(path) == "CMYK"
    arr = np.asarray(decode_rgb(path, BIG))
    assert arr.shape == (16, 20, 3) and arr.dtype == np.uint8
    assert arr[..., 0].min() > 200 and arr[..., 1].max() < 50  # cyan 0, magenta+yellow full: red


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32768, 65535, 257]], dtype=np.uint16).repeat(4, axis=0)
    path = save(tmp_path / "d.png", Image.fromarray(values))
    assert mode_of(path) == "I;16"
    arr = np.asarray(decode_rgb(path, BIG))
    assert arr.shape == (4, 4, 3) and arr.dtype == np.uint8
    assert arr[0, :, 0].tolist() == [0, 128, 255, 1]


def test_16bit_big_endian_and_32bit_modes_are_scaled(tmp_path):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    big_endian = Image.frombytes("I;16B", (3, 1), values.astype(">u2").tobytes())
    arr = np.asarray(decode_rgb(save(tmp_path / "b.tif", big_endian), BIG))
    assert arr[0, :, 1].tolist() == [0, 128, 255]
    wide = save(tmp_path / "i.tif", Image.fromarray(values.astype(np.int32)))
    assert mode_of(wide) == "I"
    assert np.asarray(decode_rgb(wide, BIG))[0, :, 2].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # left half white, landscape 40x20
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save(tmp_path / "o.jpg", Image.fromarray(pixels), exif=exif, quality=95)
    img = decode_rgb(path, BIG)
    assert img.size == (20, 40)  # portrait once upright
    arr = np.asarray(img)
    assert arr[2, 10].min() > 200 and arr[37, 10].max() < 50  # white half is now on top


def test_resize_square_shape_and_center_crop(tmp_path):
    wide = np.zeros((100, 300, 3), dtype=np.uint8)
    wide[:, :100], wide[:, 100:200], wide[:, 200:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    out = resize_square(Image.fromarray(wide), 50)
    assert out.shape == (50, 50, 3) and out.dtype == np.uint8 and out.flags.writeable
    assert (out[:, 5:45] == (0, 255, 0)).all()  # only the middle third survives the crop
    tall = resize_square(Image.new("RGB", (7, 30), (9, 9, 9)), 64)  # upscaling works too
    assert tall.shape == (64, 64, 3) and (tall == 9).all()


def test_resize_square_refuses_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        resize_square(Image.new("L", (20, 20)), 8)


# --- bad files are rejected with their reason -------------------------------------------------------

def test_good_file_passes(tmp_path):
    assert check_image(save(tmp_path / "ok.png", Image.fromarray(noise((32, 32, 3)))), BIG, 16) is None


def test_empty_file(tmp_path):
    (tmp_path / "e.png").write_bytes(b"")
    assert check_image(tmp_path / "e.png", BIG, 16) == "empty"


def test_truncated_jpeg_and_png_are_corrupt(tmp_path):
    jpg = truncated(save(tmp_path / "t.jpg", Image.fromarray(noise((64, 64, 3))), quality=90))
    png = truncated(save(tmp_path / "t.png", Image.fromarray(noise((64, 64, 3)))))
    assert check_image(jpg, BIG, 16) == "corrupt"
    assert check_image(png, BIG, 16) == "corrupt"
    with pytest.raises(DataError, match="corrupt"):
        decode_rgb(jpg, BIG)


def test_jpeg_cut_inside_its_header_is_corrupt(tmp_path):
    # A flat 64x64 JPEG is ~700 bytes, mostly tables: half of it ends inside the header, and
    # Pillow fails already in Image.open (OSError "Truncated File Read"), not in load().
    flat = truncated(save(tmp_path / "flat.jpg", Image.new("RGB", (64, 64), (90, 90, 90)), quality=90))
    assert check_image(flat, BIG, 16) == "corrupt"


def test_truncated_still_corrupt_when_pillow_is_told_to_accept_truncation(tmp_path):
    png = truncated(save(tmp_path / "t.png", Image.fromarray(noise((64, 64, 3)))))
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as some other library might set it, globally
    try:
        assert check_image(png, BIG, 16) == "corrupt"
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # and the caller's setting is restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_text_with_image_extension_is_not_an_image(tmp_path):
    (tmp_path / "x.jpg").write_text("this is not a JPEG\n")
    assert check_image(tmp_path / "x.jpg", BIG, 16) == "not_an_image"


def test_decompression_bomb_is_too_large(tmp_path):
    # A real 12000x12000 1-bit PNG is ~17 KB on disk but 144 Mpixel once decoded (over Pillow's
    # warning limit too, which must not leak out as a warning or error).
    bomb = save(tmp_path / "bomb.png", Image.new("1", (12000, 12000)))
    assert bomb.stat().st_size < 100_000
    assert check_image(bomb, 1_000_000, 16) == "too_large"
    with pytest.raises(DataError, match="too_large.*max_pixels=1000000"):
        decode_rgb(bomb, 1_000_000)


def test_forged_header_is_too_large_without_decoding(tmp_path):
    # 20000x20000 is over twice Pillow's limit (DecompressionBombError at open); the data is
    # 1 pixel, so decoding would report "corrupt": "too_large" proves the header is checked first.
    forged = forged_png(tmp_path / "f.png", 20000, 20000)
    assert check_image(forged, 40_000_000, 16) == "too_large"
    assert check_image(forged_png(tmp_path / "g.png", 3000, 3000), 1_000_000, 16) == "too_large"
    assert check_image(forged_png(tmp_path / "h.png", 3000, 3000), BIG, 16) == "corrupt"


def test_tiny_image_is_too_small(tmp_path):
    tiny = save(tmp_path / "tiny.png", Image.new("RGB", (4, 4)))
    assert check_image(tiny, BIG, 16) == "too_small"
    assert check_image(tiny, BIG, 4) is None
    assert check_image(save(tmp_path / "thin.png", Image.new("RGB", (400, 15))), BIG, 16) == "too_small"


def test_path_that_cannot_be_opened_is_unreadable(tmp_path):
    # Runs as any user, root included: open() on a folder fails with an OS error.
    (tmp_path / "folder.png").mkdir()
    assert check_image(tmp_path / "folder.png", BIG, 16) == "unreadable"
    assert check_image(tmp_path / "missing.png", BIG, 16) == "unreadable"


def check_as_nobody(path: Path) -> str | None:
    """check_image run in a forked child that dropped root to uid/gid 65534 (nobody)."""
    codes = [None, "empty", "unreadable", "not_an_image", "corrupt", "too_large", "too_small"]
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 99
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = codes.index(check_image(path, BIG, 16))
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) < len(codes), f"child failed: {status}"
    return codes[os.WEXITSTATUS(status)]


@pytest.mark.skipif(os.name != "posix", reason="chmod 000 and fork are POSIX")
def test_chmod_000_file_is_unreadable(tmp_path):
    if os.geteuid() != 0:
        path = save(tmp_path / "locked.png", Image.new("RGB", (32, 32)))
        path.chmod(0)
        assert check_image(path, BIG, 16) == "unreadable"
        return
    # Root reads chmod 000 files anyway, so as root the check runs in a child that became
    # "nobody". pytest's tmp_path sits under a 0700 folder, so the file goes in a fresh folder in
    # the system temp dir that others may traverse: only the file's own mode then blocks it.
    with tempfile.TemporaryDirectory() as shared:
        folder = Path(shared)
        if any(parent.stat().st_mode & 0o001 == 0 for parent in folder.parents):
            pytest.skip(f"a parent of {folder} is not traversable by other users")
        folder.chmod(0o711)
        path = save(folder / "locked.png", Image.new("RGB", (32, 32)))
        path.chmod(0)
        assert check_as_nobody(path) == "unreadable"
        path.chmod(0o644)
        assert check_as_nobody(path) is None  # same file readable: its mode was the only obstacle


def test_decode_error_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "x.jpg").write_text("nope")
    with pytest.raises(DataError) as info:
        decode_rgb(tmp_path / "x.jpg", BIG)
    assert str(tmp_path / "x.jpg") in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name, hidden", [
    (".DS_Store", True), ("._a.png", True), ("Thumbs.db", True), (".hidden", True), ("__MACOSX", True),
    ("a.png", False), ("cat", False), ("x.DS_Store.png", False),
])
def test_is_hidden(name, hidden):
    assert is_hidden(Path("some/dir") / name) is hidden
