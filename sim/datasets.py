"""Datasets for simulations: scikit-learn's digits written out as PNG folders, or any image folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
from PIL import Image

from edge.dataset import Sample, load_image_folder
from edge.fileio import PathLike, atomic_write_json

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_MARKER = "flora-digits.json"


@dataclass(frozen=True)
class SplitDataset:
    """A train split (to partition among clients) and a held-out test split that no client sees."""

    name: str
    classes: List[str]
    train: List[Sample]
    test: List[Sample]

    @property
    def train_labels(self) -> np.ndarray:
        return np.array([s.label for s in self.train], dtype=np.int64)


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test.extend(rng.choice(idx, round(test_fraction * len(idx)), replace=False))
    test_mask = np.zeros(len(labels), bool)
    test_mask[np.array(test, dtype=np.int64)] = True
    return np.flatnonzero(~test_mask), np.flatnonzero(test_mask)


def write_digits(out_dir: PathLike, test_fraction: float = 0.2, seed: int = 0) -> SplitDataset:
    """scikit-learn's 1797 8x8 digits as PNGs in out_dir/{train,test}/<name>/, written once and reused."""
    from sklearn.datasets import load_digits

    out = Path(out_dir)
    marker = out / _MARKER
    wanted = {"test_fraction": test_fraction, "seed": seed, "count": 1797}
    if not (marker.exists() and json.loads(marker.read_text()) == wanted):
        digits = load_digits()
        images = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)
        train_idx, test_idx = _stratified_split(digits.target, test_fraction, seed)
        for split, indices in (("train", train_idx), ("test", test_idx)):
            for i in indices:
                folder = out / split / DIGIT_NAMES[digits.target[i]]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
        (out / "classes.txt").write_text("\n".join(DIGIT_NAMES) + "\n")
        atomic_write_json(marker, wanted)
    return SplitDataset("digits", list(DIGIT_NAMES), load_image_folder(out / "train", DIGIT_NAMES),
                        load_image_folder(out / "test", DIGIT_NAMES))


def load_folder_dataset(path: PathLike, test_fraction: float = 0.2, seed: int = 0,
                        classes: Optional[List[str]] = None) -> SplitDataset:
    """An image folder: `path/{train,test}/<class>/` if present, else `path/<class>/` split here."""
    root = Path(path)
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = classes or sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        return SplitDataset(root.name, classes, load_image_folder(root / "train", classes),
                            load_image_folder(root / "test", classes))
    classes = classes or sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples = load_image_folder(root, classes)
    labels = np.array([s.label for s in samples])
    train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
    return SplitDataset(root.name, classes, [samples[i] for i in train_idx], [samples[i] for i in test_idx])
