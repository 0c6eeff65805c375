"""The simulator's data sets (flora.sim.datasets): scikit-learn's digits as PNG folders, and any image folder.
A device's own dataset (flora.edge.dataset) is tested in test_agent_dataset.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from flora.edge.dataset import DatasetError
from flora.sim.datasets import DIGIT_NAMES, MARKER, DigitsDataset, load_folder_dataset, write_digits

DIGITS = load_digits()
PER_CLASS = np.bincount(DIGITS.target)  # 178 182 177 183 181 182 181 179 174 180


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("digits") / "d")


def _index(path) -> int:
    return int(path.stem)


def _pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def test_counts_split_and_class_balance(digits):
    assert isinstance(digits, DigitsDataset) and digits.classes == DIGIT_NAMES
    assert len(digits.train) + len(digits.test) == 1797
    assert len(digits.test) == round(0.2 * 1797) == 359
    train = np.bincount(digits.train_labels, minlength=10)
    test = np.bincount(digits.test_labels, minlength=10)
    np.testing.assert_array_equal(train + test, PER_CLASS)
    assert np.all(np.abs(test - 0.2 * PER_CLASS) < 1)  # stratified: every class gives its 20 %, rounded
    ids = sorted(_index(s.path) for s in digits.train + digits.test)
    assert ids == list(range(1797))  # disjoint, complete
    for split, samples in (("train", digits.train), ("test", digits.test)):
        assert all(s.path.parent.name == DIGIT_NAMES[s.label] and s.path.parent.parent.name == split for s in samples)
        assert all(DIGITS.target[_index(s.path)] == s.label for s in samples)
    root = digits.root
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(DIGIT_NAMES)
    assert (root / "classes.txt").read_text().split() == DIGIT_NAMES
    marker = json.loads((root / MARKER).read_text())
    assert marker["seed"] == 0 and marker["test_fraction"] == 0.2 and marker["total"] == 1797
    assert sum(marker["counts"]["test"].values()) == 359


def test_arrays_of_paths_and_labels(digits):
    paths, labels = digits.train_paths, digits.train_labels
    assert paths.shape == labels.shape == (1438,) and labels.dtype == np.int64
    assert paths[0] == str(digits.train[0].path) and labels[-1] == digits.train[-1].label
    assert digits.test_paths.shape == digits.test_labels.shape == (359,)


def test_png_pixels_round_trip(digits):
    for sample in digits.train[::7] + digits.test[::7]:
        with Image.open(sample.path) as img:
            assert img.mode == "L" and img.size == (8, 8)
            pixels = np.asarray(img)
        original = DIGITS.images[_index(sample.path)]
        np.testing.assert_array_equal(pixels, np.round(original * 255 / 16).astype(np.uint8))
        np.testing.assert_array_equal(np.round(pixels.astype(np.float64) * 16 / 255), original)  # v comes back
    levels = np.unique(np.concatenate([_pixels(s.path).ravel() for s in digits.train[:200]]))
    assert levels[0] == 0 and levels[-1] == 255 and len(levels) == 17


def test_second_write_is_reused_and_a_changed_or_damaged_one_is_redone(tmp_path):
    out = tmp_path / "d"
    first = write_digits(out)
    probe = first.train[0].path
    mtime = probe.stat().st_mtime_ns
    again = write_digits(out)
    assert again == first and probe.stat().st_mtime_ns == mtime  # reused, not rewritten

    other = write_digits(out, seed=1)  # different split: rewritten, no stale files left behind
    assert {s.path.name for s in other.test} != {s.path.name for s in first.test}
    assert len(list(out.glob("*/*/*.png"))) == 1797 and not list(out.glob(".*"))

    victim = other.test[5].path
    victim.unlink()
    repaired = write_digits(out, seed=1)
    assert victim.exists() and repaired == other


def test_foreign_folders_are_never_overwritten(tmp_path):
    (tmp_path / "mine" / "train" / "cats").mkdir(parents=True)
    (tmp_path / "mine" / "train" / "cats" / "a.png").write_bytes(b"precious")
    with pytest.raises(DatasetError, match=r"already holds train/ or test/ folders that write_digits did not write"):
        write_digits(tmp_path / "mine")
    assert (tmp_path / "mine" / "train" / "cats" / "a.png").read_bytes() == b"precious"


def test_upscale_repeats_pixels(tmp_path):
    ds = write_digits(tmp_path / "big", upscale=3)
    sample = ds.test[0]
    with Image.open(sample.path) as img:
        assert img.size == (24, 24)
        pixels = np.asarray(img)
    small = np.round(DIGITS.images[_index(sample.path)] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(pixels, np.kron(small, np.ones((3, 3), np.uint8)))
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="upscale must be a positive integer"):
            write_digits(tmp_path / "bad", upscale=bad)


def test_load_folder_dataset_reads_train_and_test_folders_in_classes_txt_order(digits):
    ds = load_folder_dataset(digits.root)
    assert ds.classes == DIGIT_NAMES  # classes.txt, not the alphabetical folder order
    assert ds.train == digits.train and ds.test == digits.test and ds.name == "d"


def _folder(root, counts):
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((3, 3), i, np.uint8)).save(root / name / f"{i}.png")
    return root


def test_load_folder_dataset_splits_a_flat_folder(tmp_path):
    root = _folder(tmp_path / "pets", {"dog": 10, "cat": 5, ".hidden": 3})
    ds = load_folder_dataset(root, test_fraction=0.2, seed=0)
    assert ds.classes == ["cat", "dog"] and ds.name == "pets"
    assert np.bincount(ds.test_labels).tolist() == [1, 2] and np.bincount(ds.train_labels).tolist() == [4, 8]
    assert not {s.path for s in ds.train} & {s.path for s in ds.test}
    assert load_folder_dataset(root, seed=1).test != ds.test


def test_an_undecodable_image_is_left_out_with_one_warning(tmp_path, caplog):
    root = _folder(tmp_path / "pets", {"dog": 10, "cat": 5})
    broken = root / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with caplog.at_level("WARNING"):
        ds = load_folder_dataset(root, test_fraction=0.2, seed=0)
    assert len(ds.train) + len(ds.test) == 15 and broken not in {s.path for s in ds.train + ds.test}
    assert next(r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()).startswith(
        "1 of 16 images cannot be read and are left out")


def test_load_folder_dataset_with_only_a_train_folder_and_errors(tmp_path):
    root = _folder(tmp_path / "only" / "train", {"a": 5, "b": 5}).parent
    ds = load_folder_dataset(root, test_fraction=0.4)
    assert ds.classes == ["a", "b"] and len(ds.test) == 4 and len(ds.train) == 6
    with pytest.raises(DatasetError, match="does not exist"):
        load_folder_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="has no class folders"):
        load_folder_dataset(tmp_path / "empty")
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="has no training images"):
        load_folder_dataset(tmp_path / "hollow")


def test_client_csvs_quote_paths_with_commas_and_read_back(tmp_path):
    from flora.edge.dataset import Sample, load_csv
    from flora.sim.run import write_csv

    folder = tmp_path / 'a,b "quoted"' / "digits"
    folder.mkdir(parents=True)
    classes = ["zero", "one, or two"]
    samples = []
    for i in range(4):
        Image.fromarray(np.full((8, 8), 60 * i, dtype=np.uint8)).save(folder / f"{i},x.png")
        samples.append(Sample(folder / f"{i},x.png", i % 2))
    write_csv(tmp_path / "data.csv", samples, classes)
    assert load_csv(tmp_path / "data.csv", classes) == samples
