"""flora.edge.preprocess (PIL + numpy) equals open_clip's own eval transform on real image files.

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

import subprocess
import sys

import numpy as np
import open_clip
import pytest
from PIL import Image, ImageOps

from flora.edge.bundle import BundleError, Preprocess
from flora.edge.preprocess import ImageError, preprocess, preprocess_batch

MEAN, STD = tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD)
TOLERANCE = 1e-5


def _rgb(rng, w, h):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth(rng, w, h):
    """A smooth colour image (realistic for JPEG and palette quantisation), plus noise."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(w + h - 2, 1)], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def write_images(folder):
    """Real files of odd sizes and modes, as a device would find them: name -> path."""
    rng = np.random.default_rng(0)
    imgs = {
        "rgb_37x211.jpg": Image.fromarray(_smooth(rng, 37, 211)),
        "rgb_640x479.png": Image.fromarray(_rgb(rng, 640, 479)),
        "rgb_23x23_smaller_than_crop.png": Image.fromarray(_rgb(rng, 23, 23)),
        "rgb_224x224_exact.png": Image.fromarray(_rgb(rng, 224, 224)),
        "rgb_32x32_exact.bmp": Image.fromarray(_rgb(rng, 32, 32)),
        "gray_L_300x200.png": Image.fromarray(rng.integers(0, 256, (200, 300), dtype=np.uint8)),
        "gray_LA_51x77.png": Image.fromarray(rng.integers(0, 256, (77, 51, 2), dtype=np.uint8), "LA"),
        "cmyk_90x60.jpg": Image.fromarray(_smooth(rng, 90, 60)).convert("CMYK"),
        "palette_P_120x80.png": Image.fromarray(_smooth(rng, 120, 80)).quantize(64),
        "palette_P_65x49.gif": Image.fromarray(_smooth(rng, 65, 49)).quantize(32),
        "bilevel_1_45x70.tif": Image.fromarray(rng.integers(0, 2, (70, 45), dtype=np.uint8) * 255).convert("1"),
        "rgb_100x75.webp": Image.fromarray(_smooth(rng, 100, 75)),
    }
    # RGBA: random colours, a fully transparent band, a half-transparent band and an opaque rest
    rgba = np.concatenate([_rgb(rng, 90, 150), np.full((150, 90, 1), 255, np.uint8)], axis=2)
    rgba[:50, :, 3] = 0
    rgba[50:100, :, 3] = rng.integers(0, 256, (50, 90), dtype=np.uint8)
    imgs["rgba_90x150.png"] = Image.fromarray(rgba, "RGBA")
    paths = {}
    for name, img in imgs.items():
        paths[name] = folder / name
        img.save(paths[name], **({"quality": 90} if name.endswith(".jpg") else {}))
    # a phone photo stored sideways: 160x100 pixels, EXIF Orientation 6 (rotate 90° clockwise to show)
    sideways = Image.fromarray(_smooth(rng, 160, 100))
    exif = sideways.getexif()
    exif[0x0112] = 6
    paths["exif_orientation6_160x100.jpg"] = folder / "exif_orientation6_160x100.jpg"
    sideways.save(paths["exif_orientation6_160x100.jpg"], exif=exif, quality=90)
    # 16-bit grayscale PNG over the full 0..65535 range
    paths["gray16_I;16_70x50.png"] = folder / "gray16_I;16_70x50.png"
    Image.fromarray(rng.integers(0, 65536, (50, 70)).astype(np.uint16)).save(paths["gray16_I;16_70x50.png"])
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    paths = write_images(tmp_path_factory.mktemp("images"))
    assert sorted(paths) == NAMES
    return paths


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


NAMES = sorted([
    "rgb_37x211.jpg", "rgb_640x479.png", "rgb_23x23_smaller_than_crop.png", "rgb_224x224_exact.png",
    "rgb_32x32_exact.bmp", "gray_L_300x200.png", "gray_LA_51x77.png", "cmyk_90x60.jpg", "palette_P_120x80.png",
    "palette_P_65x49.gif", "bilevel_1_45x70.tif", "rgb_100x75.webp", "rgba_90x150.png",
    "exif_orientation6_160x100.jpg", "gray16_I;16_70x50.png",
])


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("name", NAMES)
def test_matches_open_clip_eval_transform(images, name, size):
    ours = preprocess(images[name], Preprocess(size, MEAN, STD))
    expected = _open_clip(size)(_reference_input(images[name])).numpy()
    assert ours.shape == (3, size, size) and ours.dtype == np.float32
    assert np.abs(ours - expected).max() <= TOLERANCE


@pytest.mark.parametrize(("resize_mode", "interpolation"),
                         [("longest", "bicubic"), ("squash", "bicubic"), ("shortest", "bilinear")])
@pytest.mark.parametrize("name", ["rgb_37x211.jpg", "rgb_640x479.png", "rgb_23x23_smaller_than_crop.png",
                                  "palette_P_120x80.png", "rgba_90x150.png", "gray_L_300x200.png"])
def test_other_open_clip_resize_modes_match_too(images, name, resize_mode, interpolation):
    """open_clip's 'longest' (resize, then pad with 0 in the image's own mode) and 'squash' modes."""
    pre = Preprocess(48, MEAN, STD, interpolation=interpolation, resize_mode=resize_mode)
    expected = _open_clip(48, resize_mode, interpolation)(_reference_input(images[name])).numpy()
    assert np.abs(preprocess(images[name], pre) - expected).max() <= TOLERANCE


def test_pil_images_and_paths_give_the_same_result(images):
    pre = Preprocess(32, MEAN, STD)
    for name in ("exif_orientation6_160x100.jpg", "gray16_I;16_70x50.png", "palette_P_120x80.png"):
        with Image.open(images[name]) as img:
            np.testing.assert_array_equal(preprocess(img, pre), preprocess(images[name], pre))


def test_exif_orientation_is_applied(images):
    pre = Preprocess(32, MEAN, STD)
    path = images["exif_orientation6_160x100.jpg"]
    with Image.open(path) as img:
        assert img.size == (160, 100)
        upright = ImageOps.exif_transpose(img)
        stripped = Image.fromarray(np.asarray(img.convert("RGB")))  # same pixels, no EXIF
    assert upright.size == (100, 160)  # shown portrait
    np.testing.assert_array_equal(preprocess(path, pre), preprocess(upright, pre))  # idempotent
    assert np.abs(preprocess(path, pre) - preprocess(stripped, pre)).max() > 0.5
    # open_clip on the file as is sees it sideways
    with Image.open(path) as img:
        raw = _open_clip(32)(img).numpy()
    np.testing.assert_array_equal(raw, preprocess(stripped, pre))


def test_sixteen_bit_grayscale_keeps_its_high_byte(images, tmp_path):
    pre = Preprocess(32, MEAN, STD)
    levels = np.random.default_rng(1).integers(0, 256, (40, 60), dtype=np.uint8)
    Image.fromarray(levels.astype(np.uint16) * 257).save(tmp_path / "wide.png")  # v -> v * 257 is exact 8->16 bit
    Image.fromarray(levels).save(tmp_path / "narrow.png")
    with Image.open(tmp_path / "wide.png") as wide:
        assert wide.mode == "I;16"
    np.testing.assert_array_equal(preprocess(tmp_path / "wide.png", pre), preprocess(tmp_path / "narrow.png", pre))
    # what open_clip would do with the raw 16-bit file: clip to white
    path = images["gray16_I;16_70x50.png"]
    with Image.open(path) as img:
        white = (np.asarray(img.convert("RGB")) == 255).mean()
        raw = _open_clip(32)(img).numpy()
    assert white > 0.99
    assert np.abs(raw - preprocess(path, pre)).max() > 3.0


def test_batch_stacks_single_images(images):
    pre = Preprocess(32, MEAN, STD)
    paths = [images[n] for n in ("rgb_37x211.jpg", "rgba_90x150.png", "palette_P_65x49.gif")]
    batch = preprocess_batch(paths, pre)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == np.float32
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(batch[i], preprocess(p, pre))
    assert preprocess_batch([], pre).shape == (0, 3, 32, 32)


def test_unreadable_images_name_the_file(images, tmp_path):
    pre = Preprocess(32, MEAN, STD)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "notes.png").write_text("just text")
    (tmp_path / "folder.png").mkdir()
    whole = images["rgb_640x479.png"].read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    cases = {"broken.jpg": "cannot be decoded", "notes.png": "cannot be decoded", "truncated.png": "cannot be decoded",
             "missing.png": "does not exist", "folder.png": "is a directory"}
    for name, message in cases.items():
        with pytest.raises(ImageError, match=rf"{name} {message}"):
            preprocess(tmp_path / name, pre)
    with pytest.raises(ImageError, match=r"truncated\.png cannot be decoded"):
        preprocess_batch([images["rgb_37x211.jpg"], tmp_path / "truncated.png"], pre)


@pytest.mark.parametrize(("pre", "message"), [
    (Preprocess(32, MEAN, STD, resize_mode="stretch"), r"resize_mode 'stretch' is not supported; .*'shortest'"),
    (Preprocess(32, MEAN, STD, interpolation="lanczos"), r"interpolation 'lanczos' is not supported; .*'bicubic'"),
    (Preprocess(32, MEAN, (0.5, 0.0, 0.5)), "std positive"),
])
def test_unsupported_preprocessing_is_a_bundle_error(images, pre, message):
    with pytest.raises(BundleError, match=message):
        preprocess(images["rgb_37x211.jpg"], pre)


def test_edge_preprocessing_imports_no_torch():
    code = "import sys, edge.preprocess, edge.dataset; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
