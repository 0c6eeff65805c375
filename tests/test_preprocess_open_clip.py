"""flora.edge.preprocess (PIL + numpy) equals open_clip's own eval transform on real image files (needs torch;
the Pillow-only tests are in test_preprocess.py).

Measured with open_clip 3.3.0, torchvision 0.29.1, Pillow 13.0: the max abs difference is 0.0 for
every file, mode, size and resize mode below (same Pillow calls; the normalisation table is
computed in float32 exactly as torchvision's ToTensor/Normalize do). The test allows 1e-5.

Where we deliberately differ from feeding the file straight to open_clip, the reference is given
the same first step (documented in edge.preprocess and checked separately below):
* EXIF orientation: we apply `ImageOps.exif_transpose`, open_clip does not.
* 16-bit grayscale ("I;16" PNG): we keep the high byte (as Pillow does for 16-bit RGB); open_clip's
  convert("RGB") clips every value above 255 to white (measured: 99.5 % of the pixels of the
  full-range test image, a max abs diff of 3.54 in normalised units).
"""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
from PIL import Image, ImageOps

from flora.edge.bundle import Preprocess
from flora.edge.preprocess import preprocess

from .helpers import OPENAI_MEAN as MEAN
from .helpers import OPENAI_STD as STD
from .helpers import PREPROCESS_IMAGES as NAMES

TOLERANCE = 1e-5


def test_the_tests_use_open_clips_mean_and_std():
    assert (tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD)) == (MEAN, STD)


def _reference_input(path):
    """What open_clip is given: the decoded file plus our two documented first steps."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
    if img.mode == "I;16":
        img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
    return img


def _open_clip(size, resize_mode="shortest", interpolation="bicubic"):
    return open_clip.image_transform(size, is_train=False, mean=MEAN, std=STD,
                                     interpolation=interpolation, resize_mode=resize_mode)


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("name", NAMES)
def test_matches_open_clip_eval_transform(sample_images, name, size):
    ours = preprocess(sample_images[name], Preprocess(size, MEAN, STD))
    expected = _open_clip(size)(_reference_input(sample_images[name])).numpy()
    assert ours.shape == (3, size, size) and ours.dtype == np.float32
    assert np.abs(ours - expected).max() <= TOLERANCE


@pytest.mark.parametrize(("resize_mode", "interpolation"),
                         [("longest", "bicubic"), ("squash", "bicubic"), ("shortest", "bilinear")])
@pytest.mark.parametrize("name", ["rgb_37x211.jpg", "rgb_640x479.png", "rgb_23x23_smaller_than_crop.png",
                                  "palette_P_120x80.png", "rgba_90x150.png", "gray_L_300x200.png"])
def test_other_open_clip_resize_modes_match_too(sample_images, name, resize_mode, interpolation):
    """open_clip's 'longest' (resize, then pad with 0 in the image's own mode) and 'squash' modes."""
    pre = Preprocess(48, MEAN, STD, interpolation=interpolation, resize_mode=resize_mode)
    expected = _open_clip(48, resize_mode, interpolation)(_reference_input(sample_images[name])).numpy()
    assert np.abs(preprocess(sample_images[name], pre) - expected).max() <= TOLERANCE


def test_open_clip_sees_an_exif_rotated_file_sideways(sample_images):
    """Why edge.preprocess applies EXIF orientation first: open_clip on the file as is does not."""
    pre = Preprocess(32, MEAN, STD)
    path = sample_images["exif_orientation6_160x100.jpg"]
    with Image.open(path) as img:
        stripped = Image.fromarray(np.asarray(img.convert("RGB")))  # same pixels, no EXIF
        raw = _open_clip(32)(img).numpy()
    np.testing.assert_array_equal(raw, preprocess(stripped, pre))


def test_open_clip_clips_sixteen_bit_grayscale_to_white(sample_images):
    """Why edge.preprocess keeps the high byte: open_clip's convert("RGB") turns the image white."""
    pre = Preprocess(32, MEAN, STD)
    path = sample_images["gray16_I;16_70x50.png"]
    with Image.open(path) as img:
        raw = _open_clip(32)(img).numpy()
    assert np.abs(raw - preprocess(path, pre)).max() > 3.0
