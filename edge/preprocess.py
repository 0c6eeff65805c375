"""open_clip's eval transform with PIL and numpy only, so a device needs no torch.

Same PIL operations in the same order as open_clip 3.x's `image_transform(..., is_train=False)`:
resize the shortest side to the image size (bicubic, in the image's own mode), center crop
(torchvision's rounding), convert to RGB, scale to [0, 1], normalise with the bundle's mean/std.
One addition: the EXIF orientation is applied first (`ImageOps.exif_transpose`), so a phone photo
is seen upright, as its owner sees it; open_clip leaves that to the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .bundle import Preprocess
from .fileio import PathLike

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


class ImageError(ValueError):
    """An image file cannot be read or decoded."""


def open_image(path: PathLike) -> Image.Image:
    """Decode an image file (first frame), upright per its EXIF orientation."""
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"image {path} cannot be decoded: {exc}") from exc


def resize_and_crop(img: Image.Image, pre: Preprocess) -> Image.Image:
    size = pre.image_size
    resample = _RESAMPLE.get(pre.interpolation)
    if resample is None:
        raise ValueError(f"interpolation {pre.interpolation!r} is not supported (bicubic, bilinear)")
    w, h = img.size
    if pre.resize_mode == "squash":
        return img if (w, h) == (size, size) else img.resize((size, size), resample)
    if pre.resize_mode != "shortest":
        raise ValueError(f"resize mode {pre.resize_mode!r} is not supported (shortest, squash)")
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)
    top = round((new_h - size) / 2.0)
    left = round((new_w - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def preprocess(image: Union[Image.Image, PathLike], pre: Preprocess) -> np.ndarray:
    """One image -> float32 array (3, H, W), normalised as the bundle's image encoder expects."""
    img = image if isinstance(image, Image.Image) else open_image(image)
    rgb = resize_and_crop(img, pre).convert("RGB")
    arr = np.asarray(rgb, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    arr = arr.transpose(2, 0, 1)
    mean = np.asarray(pre.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(pre.std, dtype=np.float32)[:, None, None]
    return (arr - mean) / std


def preprocess_batch(images: Sequence[Union[Image.Image, PathLike]], pre: Preprocess) -> np.ndarray:
    """Several images -> float32 array (N, 3, H, W)."""
    size = pre.image_size
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, image in enumerate(images):
        out[i] = preprocess(image, pre)
    return out


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
