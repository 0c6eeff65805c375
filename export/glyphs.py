"""Printed digits and letters made the way scikit-learn's handwritten digits were made (no download).

scikit-learn's digits are UCI's optdigits: each handwritten character was scanned as a 32 x 32
bitmap, size-normalised, and reduced to 8 x 8 by counting the set pixels of every 4 x 4 block
(17 grey levels, 0..16). Here the characters are rendered with the DejaVu fonts that matplotlib
ships, distorted (rotation, shear, stroke width, aspect, position), binarised into a 32 x 32 box
and reduced by the same block count. The result has the digits' format exactly, and a domain shift
to them (printed, not handwritten) that fine-tuning has to close.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from flora.edge.errors import FloraError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
#: the 12 text faces of DejaVu matplotlib ships (Sans, Sans Mono, Serif; regular, bold, oblique/italic)
FONT_PREFIX = "DejaVu"
CANVAS = 64  # px: glyphs are drawn at FONT_PX on this canvas, then cut to their bounding box
FONT_PX = 36
BOX = 32  # optdigits' bitmap
BLOCK = 4  # optdigits' block: 32 / 4 = 8 cells a side, 0..16 set pixels each


class GlyphError(FloraError, RuntimeError):
    """The fonts cannot be found or rendered."""


@dataclass(frozen=True)
class GlyphClass:
    """One class of the proxy corpus: the characters drawn for it and the names captions use."""

    name: str  # the class name in captions ("seven", "letter k")
    chars: Tuple[str, ...]  # what is drawn ("7"; "k" and "K")
    aliases: Tuple[str, ...] = ()  # other names captions may use ("7")
    is_digit: bool = False


def glyph_classes() -> List[GlyphClass]:
    """The 10 digits (named zero..nine, also by numeral) and the 26 letters (lower and upper case)."""
    digits = [GlyphClass(name, (str(i),), (str(i),), True) for i, name in enumerate(DIGIT_NAMES)]
    letters = [GlyphClass(f"letter {c}", (c, c.upper()), (c,)) for c in LETTERS]
    return digits + letters


def font_files() -> List[str]:
    """Paths of the DejaVu text faces in matplotlib's data folder, sorted (the corpus depends on the order)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise GlyphError("the proxy's glyphs are drawn with matplotlib's DejaVu fonts: pip install matplotlib"
                         ) from exc
    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    try:
        names = sorted(f for f in os.listdir(folder)
                       if f.startswith(FONT_PREFIX) and f.endswith(".ttf") and "Display" not in f)
    except OSError as exc:
        raise GlyphError(f"cannot list matplotlib's fonts in {folder}: {exc}") from exc
    if not names:
        raise GlyphError(f"no DejaVu fonts in {folder}")
    return [os.path.join(folder, n) for n in names]


@functools.lru_cache(maxsize=64)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(path, size)
    except OSError as exc:
        raise GlyphError(f"cannot load font {path}: {exc}") from exc


def render(char: str, font: str, rng: np.random.Generator) -> np.ndarray:
    """One distorted character as an optdigits cell grid: uint8 (8, 8), values 0..16."""
    img = Image.new("L", (CANVAS, CANVAS), 0)
    stroke = int(rng.integers(0, 3))
    ImageDraw.Draw(img).text((CANVAS // 2, CANVAS // 2), char, fill=255, font=_font(font, FONT_PX), anchor="mm",
                             stroke_width=stroke, stroke_fill=255)
    angle, shear = float(rng.normal(0.0, 10.0)), float(rng.normal(0.0, 0.2))
    img = img.rotate(angle, resample=Image.BILINEAR, center=(CANVAS // 2, CANVAS // 2))
    img = img.transform(img.size, Image.AFFINE, (1.0, shear, -shear * CANVAS / 2, 0.0, 1.0, 0.0),
                        resample=Image.BILINEAR)
    ink = np.asarray(img) > 127
    rows, cols = np.nonzero(ink)
    if rows.size == 0:  # pragma: no cover - every DejaVu glyph of the corpus has ink
        return np.zeros((BOX // BLOCK, BOX // BLOCK), np.uint8)
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    return _reduce(crop, rng)


def _reduce(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Size-normalise a binary glyph into the 32 x 32 box (jittered) and count set pixels per 4 x 4 block."""
    h, w = crop.shape
    th = int(rng.integers(24, BOX + 1))
    tw = int(np.clip(round(w * th / h * rng.uniform(0.75, 1.3)), 3, BOX))
    scaled = np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((tw, th), Image.BILINEAR)) > 127
    box = np.zeros((BOX, BOX), bool)
    top = int(np.clip((BOX - th) // 2 + rng.integers(-2, 3), 0, BOX - th))
    left = int(np.clip((BOX - tw) // 2 + rng.integers(-3, 4), 0, BOX - tw))
    box[top : top + th, left : left + tw] = scaled
    cells = BOX // BLOCK
    return box.reshape(cells, BLOCK, cells, BLOCK).sum(axis=(1, 3)).astype(np.uint8)


def corpus(n: int, seed: int, classes: Sequence[GlyphClass]) -> Tuple[np.ndarray, np.ndarray]:
    """`n` glyphs (uint8 (n, 8, 8), 0..16) and their class indices, classes drawn uniformly; seeded."""
    fonts = font_files()
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(classes), size=n)
    images = np.empty((n, BOX // BLOCK, BOX // BLOCK), np.uint8)
    for i, c in enumerate(labels):
        chars = classes[c].chars
        images[i] = render(chars[int(rng.integers(len(chars)))], fonts[int(rng.integers(len(fonts)))], rng)
    return images, labels.astype(np.int64)


def as_grey_images(cells: np.ndarray) -> List[Image.Image]:
    """Cell grids (0..16) as the 8 x 8 greyscale images the simulator writes: round(v * 255 / 16)."""
    pixels = np.round(cells.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return [Image.fromarray(p) for p in pixels]
