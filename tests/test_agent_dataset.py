"""The agent's local dataset (flora.edge.dataset): a device's image folders, CSV files, few-shot sampling and the
validation split. The simulator's data sets (flora.sim.datasets) are tested in test_sim_datasets.py."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flora.edge.dataset import (
    DatasetError,
    Sample,
    few_shot,
    load_csv,
    load_dataset,
    load_image_folder,
    report_unreadable,
    split_local,
    stratified_split,
    train_val_split,
    unreadable_images,
)

CLASSES = ["cat", "dog", "fox"]


def make_folder(root, counts, ext=".png"):
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((4, 4), i, np.uint8)).save(root / cls / f"{i:03d}{ext}", format="PNG")
    return root


def samples_of(counts):
    """In-memory samples, classes interleaved: label order 0,1,2,0,1,2,... as far as each count goes."""
    labels = [c for i in range(max(counts)) for c, n in enumerate(counts) if i < n]
    return [Sample(Path(f"/img/{i:04d}.png"), label) for i, label in enumerate(labels)]


# -- image folders -----------------------------------------------------------------------------

def test_image_folder_labels_by_bundle_class_order_then_path_order(tmp_path, caplog):
    root = make_folder(tmp_path / "data", {"dog": 3, "cat": 2})
    for ext in (".JPG", ".jpeg", ".Png", ".bmp", ".WEBP", ".gif", ".tif", ".TIFF"):  # accepted, whatever the case
        (root / "cat" / f"z{ext}").write_bytes(b"x")
    (root / "cat" / "nested").mkdir()
    (root / "cat" / "nested" / "deep.png").write_bytes(b"x")
    (root / "dog" / ".hidden.png").write_bytes(b"x")
    (root / "dog" / ".thumbnails").mkdir()
    (root / "dog" / ".thumbnails" / "t.png").write_bytes(b"x")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "photo.heic").write_bytes(b"x")
    (root / ".cache").mkdir()  # hidden folders at the top are not classes either
    with caplog.at_level(logging.INFO, logger="flora.edge.dataset"):
        samples = load_image_folder(root, CLASSES)
    assert Counter(s.label for s in samples) == {0: 2 + 8 + 1, 1: 3}  # cat=0, dog=1, no fox
    assert [s.path.relative_to(root).as_posix() for s in samples] == [
        "cat/000.png", "cat/001.png", "cat/nested/deep.png", "cat/z.JPG", "cat/z.Png", "cat/z.TIFF", "cat/z.WEBP",
        "cat/z.bmp", "cat/z.gif", "cat/z.jpeg", "cat/z.tif", "dog/000.png", "dog/001.png", "dog/002.png"]
    assert samples == load_image_folder(root, CLASSES)
    reordered = load_image_folder(root, ["fox", "dog", "cat"])  # grouped by class index, not by folder name
    assert [s.label for s in reordered] == [1] * 3 + [2] * 11
    assert "no folder for classes ['fox']" in caplog.text  # a class without a folder is allowed and said
    assert "skipped 2 files that are not images ({'.txt': 1, '.heic': 1})" in caplog.text


def test_empty_class_folders_and_stray_images_are_logged(tmp_path, caplog):
    root = make_folder(tmp_path / "data", {"cat": 1})
    (root / "fox").mkdir()
    (root / "loose.jpg").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="flora.edge.dataset"):
        samples = load_image_folder(root, CLASSES)
    assert [s.label for s in samples] == [0]
    assert "class 'fox' has no images" in caplog.text
    assert "1 images directly in" in caplog.text and "loose.jpg" in caplog.text


def test_unknown_folders_are_an_error_that_lists_them(tmp_path):
    root = make_folder(tmp_path / "data", {"cat": 1, "wolf": 1, "owl": 1, "Dog": 1})
    with pytest.raises(DatasetError, match=r"\['Dog', 'owl', 'wolf'\] \(class names are case-sensitive: "
                                           r"\{'Dog': 'dog'\}\); the bundle's classes are \['cat', 'dog', 'fox'\]"):
        load_image_folder(root, CLASSES)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match=r"image folder .*nowhere does not exist"):
        load_image_folder(tmp_path / "nowhere", CLASSES)


# -- CSV files ----------------------------------------------------------------------------------

def test_csv_with_names_indices_header_comments_and_relative_paths(tmp_path, monkeypatch):
    make_folder(tmp_path / "img", {"cat": 2, "fox": 1})
    absolute = tmp_path / "img" / "fox" / "000.png"
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"path,label\nimg/cat/000.png,cat\n img/cat/001.png , 0 ,extra column\n\n# comment\n"
                        f"{absolute},2\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path / "img")  # relative to the CSV's folder, not to the working directory
    samples = load_dataset(csv_path, CLASSES)
    assert samples == [Sample(tmp_path / "img/cat/000.png", 0), Sample(tmp_path / "img/cat/001.png", 0),
                       Sample(absolute, 2)]


def test_csv_header_is_optional_and_may_be_named_otherwise(tmp_path):
    make_folder(tmp_path / "img", {"dog": 2})
    plain = tmp_path / "plain.csv"
    plain.write_text("img/dog/000.png,dog\nimg/dog/001.png,1\n")
    named = tmp_path / "named.csv"
    named.write_bytes("\ufefffile,class\nimg/dog/000.png,dog\nimg/dog/001.png,1\n".encode())  # Excel's BOM
    expected = [Sample(tmp_path / "img/dog/000.png", 1), Sample(tmp_path / "img/dog/001.png", 1)]
    assert load_csv(plain, CLASSES) == expected
    assert load_csv(named, CLASSES) == expected


def test_csv_class_names_win_over_indices(tmp_path):
    make_folder(tmp_path / "img", {"a": 1})
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("img/a/000.png,1\nimg/a/000.png,2\n")
    assert [s.label for s in load_csv(csv_path, ["2", "1", "x"])] == [1, 0]


@pytest.mark.parametrize(
    ("row", "message"),
    [("img/cat/000.png,lion", r"label 'lion' is neither a class of the bundle \['cat', 'dog', 'fox'\] "
                              r"nor a class index 0\.\.2"),
     ("img/cat/000.png,3", "label '3' is neither"),
     ("img/cat/000.png,-1", "label .-1. is neither"),
     ("img/cat/000.png,²", "label .². is neither"),
     ("img/cat/nope.png,cat", r"image .*nope\.png does not exist"),
     ("img/cat/000.png", "expected 'path,label'"),
     ("img/cat/000.png,", "expected 'path,label'"),
     (",cat", "expected 'path,label'")],
)
def test_bad_csv_rows_name_the_line(tmp_path, row, message):
    make_folder(tmp_path / "img", {"cat": 1})
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"path,label\nimg/cat/000.png,cat\n{row}\n")
    with pytest.raises(DatasetError, match=rf"labels\.csv:3: {message}"):
        load_csv(csv_path, CLASSES)


def test_a_bad_first_row_is_an_error_when_its_image_exists(tmp_path):
    make_folder(tmp_path / "img", {"cat": 1})
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("img/cat/000.png,lion\n")
    with pytest.raises(DatasetError, match=r"labels\.csv:1: label 'lion'"):
        load_csv(csv_path, CLASSES)


def test_unreadable_csv_is_an_error(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DatasetError, match=r"cannot read .*labels\.csv as a CSV file"):
        load_csv(bad, CLASSES)


# -- load_dataset -------------------------------------------------------------------------------

def test_load_dataset_picks_folder_or_csv_and_explains_the_rest(tmp_path):
    root = make_folder(tmp_path / "data", {"fox": 2})
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("data/fox/001.png,fox\n")
    assert [s.path.name for s in load_dataset(root, CLASSES)] == ["000.png", "001.png"]
    assert load_dataset(csv_path, CLASSES) == [Sample(root / "fox" / "001.png", 2)]
    with pytest.raises(DatasetError, match=r"dataset .*nowhere does not exist: give an image folder"):
        load_dataset(tmp_path / "nowhere", CLASSES)
    with pytest.raises(DatasetError, match=r"000\.png is an image; give an image folder"):
        load_dataset(root / "fox" / "000.png", CLASSES)


# -- few-shot -----------------------------------------------------------------------------------

def test_few_shot_keeps_k_per_class_seeded_in_input_order(caplog):
    samples = samples_of([10, 10, 2])
    with caplog.at_level(logging.INFO, logger="flora.edge.dataset"):
        a = few_shot(samples, 4, seed=1)
    assert Counter(s.label for s in a) == {0: 4, 1: 4, 2: 2}
    assert "fewer than 4 images keep them all: {2: 2}" in caplog.text
    positions = [samples.index(s) for s in a]
    assert positions == sorted(positions)  # a subsequence of the input
    assert a == few_shot(samples, 4, seed=1)
    assert a != few_shot(samples, 4, seed=2)
    assert few_shot(samples, 100, seed=0) == samples
    assert few_shot([], 3, seed=0) == []
    with pytest.raises(DatasetError, match="K must be >= 1, got 0"):
        few_shot(samples, 0, seed=0)


# -- validation split ---------------------------------------------------------------------------

def test_validation_split_is_stratified_and_keeps_training_images():
    samples = samples_of([20, 10, 1])
    train, val = train_val_split(samples, 0.2, seed=0)
    assert Counter(s.label for s in val) == {0: 4, 1: 2}
    assert Counter(s.label for s in train) == {0: 16, 1: 8, 2: 1}  # a lone sample stays in training
    assert sorted(train + val, key=samples.index) == samples and not set(train) & set(val)
    assert [samples.index(s) for s in val] == sorted(samples.index(s) for s in val)
    assert train_val_split(samples, 0.2, seed=0) == (train, val)
    assert train_val_split(samples, 0.2, seed=1) != (train, val)


def test_validation_split_fraction_zero_and_bounds():
    samples = samples_of([5, 5])
    assert train_val_split(samples, 0.0, seed=0) == (samples, [])
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(DatasetError, match=r"must be in \[0, 1\)"):
            train_val_split(samples, bad, seed=0)


def test_every_class_with_two_samples_keeps_one_for_training():
    samples = samples_of([2, 2, 3, 1])
    for seed in range(5):
        train, val = train_val_split(samples, 0.9, seed)
        assert Counter(s.label for s in train) == {0: 1, 1: 1, 2: 1, 3: 1}
        assert Counter(s.label for s in val) == {0: 1, 1: 1, 2: 2}


def test_small_classes_still_give_the_requested_validation_size():
    """10 classes x 4 shots, 10 %: per-class rounding would give 0.4 -> 0 each; the total is kept at 4."""
    labels = np.repeat(np.arange(10), 4)
    keep, split = stratified_split(labels, 0.1, seed=0)
    assert len(split) == 4 and len(set(labels[split])) == 4
    np.testing.assert_array_equal(np.sort(np.concatenate([keep, split])), np.arange(40))
    other = stratified_split(labels, 0.1, seed=3)[1]
    assert not np.array_equal(split, other)  # which classes give the extra one is seeded


# -- the agent's local split: validation first, then K shots ------------------------------------

def test_shots_are_taken_after_the_validation_split():
    samples = samples_of([20, 20, 20])
    train, val = split_local(samples, 0.2, shots=16, seed=0)
    assert Counter(s.label for s in train) == {0: 16, 1: 16, 2: 16}  # K per class for training
    assert Counter(s.label for s in val) == {0: 4, 1: 4, 2: 4}  # the split comes from all 60 images
    assert not set(train) & set(val)
    assert (train, val) == split_local(samples, 0.2, shots=16, seed=0)
    assert split_local(samples, 0.2, shots=4, seed=1)[0] != split_local(samples, 0.2, shots=4, seed=2)[0]
    assert split_local(samples, 0.2, shots=None, seed=0) == train_val_split(samples, 0.2, seed=0)
    short_train, _ = split_local(samples_of([20, 6]), 0.5, shots=4, seed=0)
    assert Counter(s.label for s in short_train) == {0: 4, 1: 3}  # 6 - 3 held out: fewer than K left


def test_unreadable_images_are_found_and_reported_once(tmp_path, caplog):
    root = make_folder(tmp_path / "data", {"cat": 3})
    good = sorted((root / "cat").iterdir())
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(root / "cat" / "photo.jpg", quality=90)
    data = (root / "cat" / "photo.jpg").read_bytes()
    (root / "cat" / "cut.jpg").write_bytes(data[: len(data) // 2])  # a truncated JPEG
    (root / "cat" / "text.png").write_text("not an image")
    paths = [*good, root / "cat" / "photo.jpg", root / "cat" / "cut.jpg", root / "cat" / "text.png",
             root / "cat" / "gone.png"]
    done = []
    bad = unreadable_images(paths, progress=lambda d, t: done.append((d, t)))
    assert sorted(bad) == [4, 5, 6] and "truncated" in bad[4].lower() and done[-1] == (7, 7)
    with caplog.at_level(logging.WARNING, logger="flora.edge.dataset"):
        report_unreadable(paths, bad, first=2)
        report_unreadable(paths, {})
    (record,) = caplog.records
    assert record.getMessage().startswith(f"3 of 7 images cannot be read and are left out: {paths[4]}, {paths[5]}, ...")
    assert "first reason: OSError" in record.getMessage()
