"""open_clip's eval transform with PIL and numpy only, so a device needs no torch.

The same Pillow calls in the same order as open_clip 3.x's `image_transform(..., is_train=False)`
(torchvision `Resize`/`CenterCrop` on PIL images, then `convert("RGB")`, `ToTensor`, `Normalize`),
so the result equals open_clip's to the last bit. The resize and crop happen in the image's own
mode, as there: Pillow resizes palette ("P") and 1-bit images with nearest neighbour whatever the
filter, and RGBA with premultiplied alpha; transparency is then dropped, not composited.

Two steps come first, before what open_clip sees:

* EXIF orientation is applied (`ImageOps.exif_transpose`), so a phone photo is seen upright, as
  its owner sees it; open_clip leaves that to the caller. It is idempotent: the tag is removed.
* 16-bit grayscale ("I;16", e.g. a 16-bit PNG) becomes 8-bit grayscale by its high byte, as
  Pillow itself does for 16-bit RGB. open_clip's `convert("RGB")` would clip every value above
  255 to white instead, which turns a real 16-bit image into a nearly white one.
"""

from __future__ import annotations

import functools
from typing import Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .bundle import BundleError, Preprocess
from .errors import FloraError
from .fileio import PathLike

ImageInput = Union[Image.Image, PathLike]

#: open_clip's eval transform maps "random" to bicubic too.
RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "random": Image.BICUBIC}
RESIZE_MODES = ("shortest", "longest", "squash")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ORIENTATION = 0x0112  # the EXIF tag


class ImageError(FloraError, ValueError):
    """An image file cannot be read, decoded or converted."""


def open_image(path: PathLike) -> Image.Image:
    """Decode an image file (its first frame) and return it upright, as `upright` does."""
    try:
        with Image.open(path) as img:
            img.load()
            return upright(img)
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise ImageError(f"image {path} is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise ImageError(f"image {path} cannot be decoded: not an image format Pillow knows") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"image {path} cannot be decoded: {exc}") from exc


def upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and reduce 16-bit grayscale to 8-bit (see the module docstring)."""
    if img.getexif().get(_ORIENTATION, 1) in range(2, 9):  # as exif_transpose reads it; skips its copy
        img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT_MODES:
        img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
    return img


def check(pre: Preprocess) -> None:
    """Raise BundleError for preprocessing this module cannot reproduce."""
    if pre.interpolation not in RESAMPLE:
        raise BundleError(f"preprocess interpolation {pre.interpolation!r} is not supported; "
                          f"use one of {list(RESAMPLE)}")
    if pre.resize_mode not in RESIZE_MODES:
        raise BundleError(f"preprocess resize_mode {pre.resize_mode!r} is not supported; "
                          f"use one of {list(RESIZE_MODES)}")
    if pre.image_size < 1:
        raise BundleError(f"preprocess image_size must be positive, got {pre.image_size}")
    if len(pre.mean) != 3 or len(pre.std) != 3 or not all(s > 0 for s in pre.std):
        raise BundleError(f"preprocess mean and std need 3 values each, std positive: {pre.mean}, {pre.std}")


def resize_and_crop(img: Image.Image, pre: Preprocess) -> Image.Image:
    """open_clip's geometry: resize (shortest side, longest side or squash), then center crop or pad."""
    check(pre)
    size, resample = pre.image_size, RESAMPLE[pre.interpolation]
    w, h = img.size
    if pre.resize_mode == "squash":
        new_w, new_h = size, size
    elif pre.resize_mode == "shortest":  # torchvision's _compute_resized_output_size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:  # "longest": open_clip's ResizeKeepRatio(longest=1)
        ratio = max(h / size, w / size)
        new_w, new_h = round(w / ratio), round(h / ratio)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)
    return _center_crop_or_pad(img, size)


def _center_crop_or_pad(img: Image.Image, size: int) -> Image.Image:
    """torchvision's center_crop on a PIL image: pad with 0 where smaller, then crop with its rounding."""
    w, h = img.size
    if w < size or h < size:
        dw, dh = max(size - w, 0), max(size - h, 0)
        bands = len(img.getbands())
        fill = 0 if bands == 1 else (0,) * bands
        palette = img.getpalette() if img.mode == "P" else None
        img = ImageOps.expand(img, border=(dw // 2, dh // 2, (dw + 1) // 2, (dh + 1) // 2), fill=fill)
        if palette is not None:
            img.putpalette(palette)
        w, h = img.size
    if (w, h) == (size, size):
        return img
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


@functools.lru_cache(maxsize=16)
def _lookup_table(mean: Tuple[float, ...], std: Tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: ((v / 255) - mean) / std per channel, in float32 as torchvision computes it."""
    levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    return (levels[None, :] - m) / s


def _preprocess_into(image: ImageInput, pre: Preprocess, out: np.ndarray) -> None:
    if isinstance(image, Image.Image):
        name, img = "the image", upright(image)
    else:
        name, img = f"image {image}", open_image(image)
    try:
        rgb = resize_and_crop(img, pre).convert("RGB")
    except BundleError:
        raise
    except (OSError, ValueError) as exc:
        raise ImageError(f"{name} (mode {img.mode}) cannot be resized or converted to RGB: {exc}") from exc
    pixels = np.asarray(rgb)
    table = _lookup_table(tuple(pre.mean), tuple(pre.std))
    for c in range(3):
        np.take(table[c], pixels[:, :, c], out=out[c])


def preprocess(image: ImageInput, pre: Preprocess) -> np.ndarray:
    """One image (a PIL image or a file path) -> float32 (3, H, W), as the bundle's image encoder expects."""
    check(pre)
    out = np.empty((3, pre.image_size, pre.image_size), dtype=np.float32)
    _preprocess_into(image, pre, out)
    return out


def preprocess_batch(images: Sequence[ImageInput], pre: Preprocess) -> np.ndarray:
    """Several images -> float32 (N, 3, H, W); an unreadable one raises ImageError naming its file."""
    check(pre)
    out = np.empty((len(images), 3, pre.image_size, pre.image_size), dtype=np.float32)
    for i, image in enumerate(images):
        _preprocess_into(image, pre, out[i])
    return out
