"""flora.edge.preprocess with Pillow and numpy alone: paths and PIL images, EXIF orientation, 16-bit grayscale,
batches, unreadable files, unsupported settings. Runs without torch (the last test proves it);
test_preprocess_open_clip.py compares the same images with open_clip's own eval transform."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from flora.edge.bundle import BundleError, Preprocess
from flora.edge.preprocess import ImageError, preprocess, preprocess_batch

from .helpers import OPENAI_MEAN as MEAN
from .helpers import OPENAI_STD as STD
from .helpers import run_pytest_blocking


def test_pil_images_and_paths_give_the_same_result(sample_images):
    pre = Preprocess(32, MEAN, STD)
    for name in ("exif_orientation6_160x100.jpg", "gray16_I;16_70x50.png", "palette_P_120x80.png"):
        with Image.open(sample_images[name]) as img:
            np.testing.assert_array_equal(preprocess(img, pre), preprocess(sample_images[name], pre))


def test_exif_orientation_is_applied(sample_images):
    pre = Preprocess(32, MEAN, STD)
    path = sample_images["exif_orientation6_160x100.jpg"]
    with Image.open(path) as img:
        assert img.size == (160, 100)
        upright = ImageOps.exif_transpose(img)
        stripped = Image.fromarray(np.asarray(img.convert("RGB")))  # same pixels, no EXIF
    assert upright.size == (100, 160)  # shown portrait
    np.testing.assert_array_equal(preprocess(path, pre), preprocess(upright, pre))  # idempotent
    assert np.abs(preprocess(path, pre) - preprocess(stripped, pre)).max() > 0.5


def test_sixteen_bit_grayscale_keeps_its_high_byte(sample_images, tmp_path):
    pre = Preprocess(32, MEAN, STD)
    levels = np.random.default_rng(1).integers(0, 256, (40, 60), dtype=np.uint8)
    Image.fromarray(levels.astype(np.uint16) * 257).save(tmp_path / "wide.png")  # v -> v * 257 is exact 8->16 bit
    Image.fromarray(levels).save(tmp_path / "narrow.png")
    with Image.open(tmp_path / "wide.png") as wide:
        assert wide.mode == "I;16"
    np.testing.assert_array_equal(preprocess(tmp_path / "wide.png", pre), preprocess(tmp_path / "narrow.png", pre))
    path = sample_images["gray16_I;16_70x50.png"]
    with Image.open(path) as img:
        white = (np.asarray(img.convert("RGB")) == 255).mean()
    assert white > 0.99  # Pillow's own convert("RGB") clips the 16-bit values: what preprocess avoids


def test_batch_stacks_single_images(sample_images):
    pre = Preprocess(32, MEAN, STD)
    paths = [sample_images[n] for n in ("rgb_37x211.jpg", "rgba_90x150.png", "palette_P_65x49.gif")]
    batch = preprocess_batch(paths, pre)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == np.float32
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(batch[i], preprocess(p, pre))
    assert preprocess_batch([], pre).shape == (0, 3, 32, 32)


def test_unreadable_images_name_the_file(sample_images, tmp_path):
    pre = Preprocess(32, MEAN, STD)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "notes.png").write_text("just text")
    (tmp_path / "folder.png").mkdir()
    whole = sample_images["rgb_640x479.png"].read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    cases = {"broken.jpg": "cannot be decoded", "notes.png": "cannot be decoded", "truncated.png": "cannot be decoded",
             "missing.png": "does not exist", "folder.png": "is a directory"}
    for name, message in cases.items():
        with pytest.raises(ImageError, match=rf"{name} {message}"):
            preprocess(tmp_path / name, pre)
    with pytest.raises(ImageError, match=r"truncated\.png cannot be decoded"):
        preprocess_batch([sample_images["rgb_37x211.jpg"], tmp_path / "truncated.png"], pre)


@pytest.mark.parametrize(("pre", "message"), [
    (Preprocess(32, MEAN, STD, resize_mode="stretch"), r"resize_mode 'stretch' is not supported; .*'shortest'"),
    (Preprocess(32, MEAN, STD, interpolation="lanczos"), r"interpolation 'lanczos' is not supported; .*'bicubic'"),
    (Preprocess(32, MEAN, (0.5, 0.0, 0.5)), "std positive"),
])
def test_unsupported_preprocessing_is_a_bundle_error(sample_images, pre, message):
    with pytest.raises(BundleError, match=message):
        preprocess(sample_images["rgb_37x211.jpg"], pre)


def test_these_tests_import_neither_torch_nor_open_clip():
    """This module's tests pass in a process where importing torch, torchvision or open_clip raises."""
    proc = run_pytest_blocking(("torch", "torchvision", "open_clip"), __file__, "-k", "not import_neither")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "BLOCKED-TRIED [] LOADED []" in proc.stdout and " passed" in proc.stdout
