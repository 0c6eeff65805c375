"""A device's local dataset: image folders, CSV files, few-shot sampling and the validation split."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from edge.dataset import DatasetError, few_shot, load_csv, load_dataset, load_image_folder, train_val_split

CLASSES = ["cat", "dog", "fox"]


def make_folder(root, counts):
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((4, 4), i, np.uint8)).save(root / cls / f"{i:03d}.png")
    return root


def test_image_folder_labels_by_bundle_class_order(tmp_path, caplog):
    root = make_folder(tmp_path / "data", {"dog": 3, "cat": 2})
    (root / "dog" / ".hidden.png").write_bytes(b"x")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "cat" / "UPPER.PNG").write_bytes((root / "cat" / "000.png").read_bytes())
    with caplog.at_level(logging.INFO):
        samples = load_image_folder(root, CLASSES)
    assert Counter(s.label for s in samples) == {0: 3, 1: 3}  # cat=0 (+ UPPER.PNG), dog=1, no fox
    assert [s.path.name for s in samples if s.label == 0] == ["000.png", "001.png", "UPPER.PNG"]
    assert "fox" in caplog.text  # a class without a folder is allowed and said


def test_unknown_folders_are_an_error_that_lists_them(tmp_path):
    root = make_folder(tmp_path / "data", {"cat": 1, "wolf": 1, "owl": 1})
    with pytest.raises(DatasetError, match=r"\['owl', 'wolf'\]"):
        load_image_folder(root, CLASSES)


def test_csv_with_names_indices_header_and_relative_paths(tmp_path):
    make_folder(tmp_path / "img", {"cat": 2, "fox": 1})
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\nimg/cat/000.png,cat\nimg/cat/001.png,0\n\n# comment\nimg/fox/000.png,fox\n")
    samples = load_dataset(csv_path, CLASSES)
    assert [(s.path.name, s.label) for s in samples] == [("000.png", 0), ("001.png", 0), ("000.png", 2)]
    assert all(s.path.is_absolute() or s.path.exists() for s in samples)


@pytest.mark.parametrize(
    ("row", "message"),
    [("img/cat/000.png,lion", "label 'lion' is not a class"), ("img/cat/nope.png,cat", "does not exist"),
     ("img/cat/000.png", "expected 'path,label'")],
)
def test_bad_csv_rows_name_the_line(tmp_path, row, message):
    make_folder(tmp_path / "img", {"cat": 1})
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"img/cat/000.png,cat\n{row}\n")
    with pytest.raises(DatasetError, match=f"labels.csv:2: .*{message}"):
        load_csv(csv_path, CLASSES)


def test_few_shot_keeps_k_per_class_seeded(tmp_path):
    samples = load_image_folder(make_folder(tmp_path / "d", {"cat": 10, "dog": 10, "fox": 2}), CLASSES)
    a = few_shot(samples, 4, seed=1)
    assert Counter(s.label for s in a) == {0: 4, 1: 4, 2: 2}
    assert a == few_shot(samples, 4, seed=1)
    assert a != few_shot(samples, 4, seed=2)
    with pytest.raises(DatasetError):
        few_shot(samples, 0, seed=0)


def test_validation_split_is_stratified_and_keeps_training_images(tmp_path):
    samples = load_image_folder(make_folder(tmp_path / "d", {"cat": 20, "dog": 10, "fox": 1}), CLASSES)
    train, val = train_val_split(samples, 0.2, seed=0)
    assert Counter(s.label for s in val) == {0: 4, 1: 2}
    assert Counter(s.label for s in train) == {0: 16, 1: 8, 2: 1}  # a lone fox stays in training
    assert not set(train) & set(val)
    assert train_val_split(samples, 0.0, seed=0) == (samples, [])
    with pytest.raises(DatasetError):
        train_val_split(samples, 1.0, seed=0)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nowhere", CLASSES)
