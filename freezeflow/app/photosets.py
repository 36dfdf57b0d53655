"""Real image folders built offline from the photos that ship inside scikit-image (no download).

The digits are easy: 8x8 glyphs upscaled. These sets are what users bring: photos cut into
patches at random scales, rotations and crops, JPEG-compressed, grayscale and RGB mixed, and one
rare class. They judge accuracy (`freezeflow bench quality`) and feed tests with real files.

    textures  8 classes: patches of 6 grayscale and 2 RGB texture photos (brick, grass, gravel,
              moon, coins, cell, immunohistochemistry, retina); RGB sources partly grayscale,
              gray ones partly tinted; `cell` is the rare class.
    scenes    8 classes: larger crops of 8 photos (astronaut, chelsea, coffee, rocket, hubble,
              camera, clock, page); `page` is rare. Color is partly removed, so shape must carry.
    glyphs    10 classes of look-alike characters (O 0 Q D C G 8 B 5 S) drawn in Pillow's own
              font at random size, angle and color on patches of 8 photos; `Q` is rare. Far
              from ImageNet: a linear probe is not enough, fine-tuning has to adapt the body.

`write_photoset(name, dest, per_class, seed)` writes dest/<class>/<nnnn>.jpg and is deterministic
for a given Pillow and scikit-image. Adapter module: needs scikit-image (`pip install -e .[test]`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from freezeflow.core.io import write_bytes_atomic
from freezeflow.core.errors import UserError

RARE_FRACTION = 0.25  # the rare class has this fraction of the others' images
GLYPHS = ("O", "0", "Q", "D", "C", "G", "8", "B", "5", "S")
GLYPH_NAMES = {"O": "letter_O", "0": "digit_0", "Q": "letter_Q", "D": "letter_D", "C": "letter_C",
               "G": "letter_G", "8": "digit_8", "B": "letter_B", "5": "digit_5", "S": "letter_S"}
BACKGROUNDS = ("astronaut", "coffee", "chelsea", "grass", "brick", "gravel", "rocket", "immunohistochemistry")


@dataclass(frozen=True)
class PhotoSet:
    classes: tuple[str, ...]  # class names (folder names)
    rare: str
    make: Callable[[str, np.random.Generator, dict], Image.Image]  # (class, rng, sources) -> image
    sources: tuple[str, ...]  # scikit-image sample names this set reads


def load_sources(names: tuple[str, ...]) -> dict[str, Image.Image]:
    """scikit-image's bundled sample photos as PIL images (grayscale stays 'L')."""
    try:
        from skimage import data as skdata
    except ImportError as exc:
        raise UserError("photo datasets need scikit-image: pip install scikit-image (or -e '.[test]')") from exc
    out = {}
    for name in names:
        pixels = getattr(skdata, name)()
        if pixels.dtype != np.uint8:
            pixels = (pixels * 255).astype(np.uint8)
        out[name] = Image.fromarray(pixels[..., :3] if pixels.ndim == 3 else pixels)
    return out


def random_patch(src: Image.Image, rng: np.random.Generator, lo: float, hi: float, rotate: bool = True,
                 margin: float = 0.0) -> Image.Image:
    """A square crop of side lo..hi of the short side, at a random place and angle (no black corners)."""
    width, height = src.size
    short = min(width, height)
    side = int(short * rng.uniform(lo, hi))
    reach = int(side * 1.42) if rotate else side  # the crop's diagonal: room to rotate inside the photo
    reach = min(reach, short)
    m = int(short * margin)
    x0 = int(rng.integers(m, max(m + 1, width - reach - m)))
    y0 = int(rng.integers(m, max(m + 1, height - reach - m)))
    patch = src.crop((x0, y0, x0 + reach, y0 + reach))
    if rotate:
        patch = patch.rotate(float(rng.uniform(0, 360)), resample=Image.BICUBIC)
    c = (reach - side) // 2
    patch = patch.crop((c, c, c + side, c + side))
    if rng.random() < 0.5:
        patch = ImageOps.mirror(patch)
    return patch


def vary_color(patch: Image.Image, rng: np.random.Generator, to_gray: float, tint: float) -> Image.Image:
    """Mix grayscale and RGB: RGB patches become gray with p=to_gray, gray ones tinted with p=tint."""
    if patch.mode == "RGB" and rng.random() < to_gray:
        return patch.convert("L")
    if patch.mode == "L" and rng.random() < tint:
        color = tuple(int(v) for v in rng.integers(120, 256, 3))
        return ImageOps.colorize(patch, black=(0, 0, 0), white=color)
    return patch


def jitter_light(patch: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness and contrast jitter (x0.7..1.3 around the mean), as lighting varies between photos."""
    pixels = np.asarray(patch).astype(np.float32)
    mean = pixels.mean()
    pixels = (pixels - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.8, 1.2)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), patch.mode)


def finish(patch: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Resize to a random output side (48..128 px): users' folders never have one size."""
    side = int(rng.integers(48, 129))
    return patch.resize((side, side), Image.BILINEAR)


def make_texture(cls: str, rng: np.random.Generator, sources: dict) -> Image.Image:
    margin = 0.12 if cls == "retina" else 0.0  # retina's photo has a black border around the eye
    patch = random_patch(sources[cls], rng, 0.03, 0.12, margin=margin)
    return finish(jitter_light(vary_color(patch, rng, to_gray=0.6, tint=0.3), rng), rng)


def make_scene(cls: str, rng: np.random.Generator, sources: dict) -> Image.Image:
    src = sources["hubble_deep_field" if cls == "hubble" else cls]
    patch = random_patch(src, rng, 0.06, 0.2, rotate=rng.random() < 0.5)
    return finish(jitter_light(vary_color(patch, rng, to_gray=0.6, tint=0.2), rng), rng)


def make_glyph(cls: str, rng: np.random.Generator, sources: dict) -> Image.Image:
    """A character of Pillow's bundled font on a photo patch, in a color that stands out from it."""
    char = next(c for c, name in GLYPH_NAMES.items() if name == cls)
    background = sources[BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]]
    patch = random_patch(background, rng, 0.15, 0.4).convert("RGB").resize((96, 96), Image.BILINEAR)
    size = int(rng.integers(56, 84))
    layer = Image.new("L", (96, 96), 0)
    draw = ImageDraw.Draw(layer)
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
    x = (96 - (right - left)) / 2 - left + rng.uniform(-6, 6)
    y = (96 - (bottom - top)) / 2 - top + rng.uniform(-6, 6)
    draw.text((x, y), char, fill=255, font=font, stroke_width=int(rng.integers(1, 4)), stroke_fill=255)
    layer = layer.rotate(float(rng.uniform(-20, 20)), resample=Image.BICUBIC)
    mean = np.asarray(patch).reshape(-1, 3).mean(0)
    ink = tuple(int(np.clip(255 - v + rng.uniform(-30, 30), 0, 255)) for v in mean)  # roughly the opposite color
    patch = Image.composite(Image.new("RGB", (96, 96), ink), patch, layer)
    return finish(jitter_light(vary_color(patch, rng, to_gray=0.3, tint=0.0), rng), rng)


PHOTOSETS = {
    "textures": PhotoSet(("brick", "grass", "gravel", "moon", "coins", "cell", "immunohistochemistry", "retina"),
                         "cell", make_texture,
                         ("brick", "grass", "gravel", "moon", "coins", "cell", "immunohistochemistry", "retina")),
    "scenes": PhotoSet(("astronaut", "chelsea", "coffee", "rocket", "hubble", "camera", "clock", "page"),
                       "page", make_scene,
                       ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "camera", "clock", "page")),
    "glyphs": PhotoSet(tuple(GLYPH_NAMES[c] for c in GLYPHS), GLYPH_NAMES["Q"], make_glyph, BACKGROUNDS),
}


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def class_counts(name: str, per_class: int) -> dict[str, int]:
    """Images per class of photo set `name`: per_class, and RARE_FRACTION of it for the rare class."""
    spec = PHOTOSETS[name]
    return {cls: max(4, int(per_class * RARE_FRACTION)) if cls == spec.rare else per_class for cls in spec.classes}


def write_photoset(name: str, dest: Path, per_class: int = 130, seed: int = 0) -> dict:
    """Write photo set `name` as dest/<class>/<nnnn>.jpg; the rare class gets RARE_FRACTION of per_class."""
    if name not in PHOTOSETS:
        raise UserError(f"unknown photo set {name!r}; allowed: {', '.join(PHOTOSETS)}")
    if per_class < 4:
        raise UserError(f"--per-class {per_class}: allowed: >= 4 (every class needs train, val and test images)")
    spec = PHOTOSETS[name]
    sources = load_sources(spec.sources)
    counts = {}
    for c, cls in enumerate(spec.classes):
        n = class_counts(name, per_class)[cls]
        rng = np.random.default_rng([seed, c])  # one stream per class: per_class changes no other class
        for i in range(n):
            image = spec.make(cls, rng, sources)
            path = Path(dest) / cls / f"{i:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, encode_jpeg(image, int(rng.integers(75, 96))))
        counts[cls] = n
    return {"name": name, "images": sum(counts.values()), "classes": counts, "rare": spec.rare}
