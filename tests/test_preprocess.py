"""edge.preprocess (PIL + numpy) equals open_clip's own eval transform on real image files."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
from PIL import Image, ImageOps

from edge.bundle import Preprocess
from edge.preprocess import ImageError, preprocess, preprocess_batch

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def write_images(folder):
    """Real files of odd sizes and modes, as a device would find them."""
    rng = np.random.default_rng(0)
    files = {}

    def rgb(h, w):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    files["rgb_37x211.jpg"] = Image.fromarray(rgb(211, 37))
    files["rgb_640x479.png"] = Image.fromarray(rgb(479, 640))
    files["rgb_23x23_smaller_than_crop.png"] = Image.fromarray(rgb(23, 23))
    files["rgb_224x224_exact.png"] = Image.fromarray(rgb(224, 224))
    files["gray_300x200.png"] = Image.fromarray(rng.integers(0, 256, (200, 300), dtype=np.uint8), mode="L")
    rgba = np.concatenate([rgb(150, 90), rng.integers(0, 256, (150, 90, 1), dtype=np.uint8)], axis=2)
    files["rgba_90x150.png"] = Image.fromarray(rgba, mode="RGBA")
    files["palette_120x80.png"] = Image.fromarray(rgb(80, 120)).convert("P", palette=Image.ADAPTIVE, colors=64)
    paths = {}
    for name, img in files.items():
        path = folder / name
        img.save(path, quality=90) if name.endswith(".jpg") else img.save(path)
        paths[name] = path
    rotated = Image.fromarray(rgb(100, 160))
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    paths["exif_rotated_160x100.jpg"] = folder / "exif_rotated_160x100.jpg"
    rotated.save(paths["exif_rotated_160x100.jpg"], exif=exif, quality=90)
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("size", [32, 224])
def test_matches_open_clip_eval_transform(images, size):
    pre = Preprocess(size, tuple(MEAN), tuple(STD))
    reference = open_clip.image_transform(size, is_train=False, mean=MEAN, std=STD,
                                          interpolation="bicubic", resize_mode="shortest")
    for name, path in images.items():
        ours = preprocess(path, pre)
        with Image.open(path) as img:
            # open_clip does not apply EXIF orientation; we do (see edge.preprocess), so give it the same image
            expected = reference(ImageOps.exif_transpose(img)).numpy()
        assert ours.shape == (3, size, size) and ours.dtype == np.float32
        assert np.abs(ours - expected).max() <= 1e-5, name


def test_exif_orientation_is_applied(images):
    pre = Preprocess(32, tuple(MEAN), tuple(STD))
    path = images["exif_rotated_160x100.jpg"]
    with Image.open(path) as img:
        assert img.size == (160, 100)
        upright = ImageOps.exif_transpose(img)
        assert upright.size == (100, 160)  # shown portrait
        sideways = preprocess(img.convert("RGB"), pre)
    assert np.abs(preprocess(path, pre) - preprocess(upright, pre)).max() == 0
    assert np.abs(preprocess(path, pre) - sideways).max() > 0.1


def test_batch_stacks_single_images(images):
    pre = Preprocess(32, tuple(MEAN), tuple(STD))
    paths = list(images.values())[:3]
    batch = preprocess_batch(paths, pre)
    assert batch.shape == (3, 3, 32, 32)
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(batch[i], preprocess(p, pre))


def test_unreadable_images_name_the_file(tmp_path):
    pre = Preprocess(32, tuple(MEAN), tuple(STD))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError, match=r"broken\.jpg cannot be decoded"):
        preprocess(broken, pre)
    with pytest.raises(ImageError, match=r"missing\.png does not exist"):
        preprocess(tmp_path / "missing.png", pre)
