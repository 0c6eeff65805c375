"""Datasets for simulations: scikit-learn's digits written out as PNG folders, or any image folder.

Both give a `SplitDataset`: a train split (partitioned among the clients) and a held-out test split
that no client sees, as `Sample` lists and as numpy arrays of paths and labels.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from flora.edge.dataset import (
    DatasetError,
    Sample,
    load_image_folder,
    report_unreadable,
    stratified_split,
    unreadable_images,
)
from flora.edge.fileio import PathLike, atomic_write_json

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MARKER = "flora-digits.json"
CLASSES_FILE = "classes.txt"
SPLITS = ("train", "test")
_FORMAT = 2  # bump when the written files change


@dataclass(frozen=True)
class SplitDataset:
    """A train split (to partition among clients) and a held-out test split that no client sees."""

    name: str
    classes: List[str]
    train: List[Sample]
    test: List[Sample]

    @property
    def train_paths(self) -> np.ndarray:
        return np.array([str(s.path) for s in self.train], dtype=str)

    @property
    def train_labels(self) -> np.ndarray:
        return np.array([s.label for s in self.train], dtype=np.int64)

    @property
    def test_paths(self) -> np.ndarray:
        return np.array([str(s.path) for s in self.test], dtype=str)

    @property
    def test_labels(self) -> np.ndarray:
        return np.array([s.label for s in self.test], dtype=np.int64)


@dataclass(frozen=True)
class DigitsDataset(SplitDataset):
    """scikit-learn's digits as PNG files under `root`."""

    root: Path


def _counts(labels: Sequence[int], classes: Sequence[str]) -> Dict[str, int]:
    found = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    return {name: int(n) for name, n in zip(classes, found)}


def _complete(out: Path, wanted: Dict) -> Optional[DigitsDataset]:
    """The existing write in `out` if its marker matches `wanted` and every file is there, else None."""
    try:
        marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if {k: marker.get(k) for k in wanted} != wanted:
        return None
    splits = {split: load_image_folder(out / split, DIGIT_NAMES) if (out / split).is_dir() else []
              for split in SPLITS}
    counts = marker.get("counts", {})
    if any(_counts([x.label for x in splits[s]], DIGIT_NAMES) != counts.get(s) for s in SPLITS):
        return None
    return DigitsDataset("digits", list(DIGIT_NAMES), splits["train"], splits["test"], out)


def write_digits(out_dir: PathLike, test_fraction: float = 0.2, seed: int = 0,
                 upscale: Optional[int] = None) -> DigitsDataset:
    """scikit-learn's 1797 8x8 digits as grayscale PNGs in `out_dir/{train,test}/<name>/<index>.png`.

    Class names are zero..nine (also in `classes.txt`); the 17 gray levels 0..16 become
    round(v * 255 / 16). The test split is stratified and seeded (`edge.dataset.stratified_split`).
    `upscale` (an integer factor) repeats each pixel into an upscale x upscale block. The write is
    reused when `flora-digits.json` matches the arguments and every file is present; otherwise it
    is redone, in a staging folder first. Folders train/ or test/ that this function did not write
    are never touched (an error instead).
    """
    if upscale is None:
        factor = 1
    elif isinstance(upscale, (int, np.integer)) and not isinstance(upscale, bool) and upscale >= 1:
        factor = int(upscale)
    else:
        raise ValueError(f"upscale must be a positive integer factor or None, got {upscale!r}")
    out = Path(out_dir)
    wanted = {"format": _FORMAT, "test_fraction": float(test_fraction), "seed": int(seed), "upscale": factor}
    existing = _complete(out, wanted)
    if existing is not None:
        return existing
    if not (out / MARKER).exists() and any((out / s).exists() and any((out / s).iterdir()) for s in SPLITS):
        raise DatasetError(f"{out} already holds train/ or test/ folders that write_digits did not write "
                           f"(no {MARKER}); give it an empty or new folder")

    from sklearn.datasets import load_digits  # simulator only: an edge device needs no scikit-learn

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    if factor > 1:
        pixels = pixels.repeat(factor, axis=1).repeat(factor, axis=2)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    stage = out / ".flora-digits-staging"
    shutil.rmtree(stage, ignore_errors=True)
    for split, indices in (("train", train_idx), ("test", test_idx)):
        (stage / split).mkdir(parents=True)
        for name in {DIGIT_NAMES[c] for c in labels[indices]}:
            (stage / split / name).mkdir()
        for i in indices:
            Image.fromarray(pixels[i]).save(stage / split / DIGIT_NAMES[labels[i]] / f"{i:04d}.png")
    for split in SPLITS:  # ours: the marker says so (checked above)
        shutil.rmtree(out / split, ignore_errors=True)
        (stage / split).rename(out / split)
    shutil.rmtree(stage)
    (out / CLASSES_FILE).write_text("\n".join(DIGIT_NAMES) + "\n", encoding="utf-8")
    counts = {"train": _counts(labels[train_idx], DIGIT_NAMES), "test": _counts(labels[test_idx], DIGIT_NAMES)}
    atomic_write_json(out / MARKER, {**wanted, "source": "sklearn.datasets.load_digits", "total": len(labels),
                                     "counts": counts})
    result = _complete(out, wanted)
    assert result is not None, f"digits written to {out} do not read back"
    return result


def _read_classes(root: Path, folders: Sequence[Path]) -> List[str]:
    """`classes.txt` (one name a line) if present, else the sorted names of the non-hidden subfolders."""
    listed = root / CLASSES_FILE
    if listed.is_file():
        return [line.strip() for line in listed.read_text(encoding="utf-8").splitlines() if line.strip()]
    names = {p.name for folder in folders if folder.is_dir()
             for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return sorted(names)


def readable(samples: List[Sample]) -> List[Sample]:
    """`samples` less the images that cannot be decoded (one warning names them), so one broken file in a
    folder dataset neither aborts the held-out evaluation nor the baselines."""
    paths = [s.path for s in samples]
    bad = unreadable_images(paths)
    report_unreadable(paths, bad)
    return [s for i, s in enumerate(samples) if i not in bad]


def load_folder_dataset(path: PathLike, test_fraction: float = 0.2, seed: int = 0,
                        classes: Optional[List[str]] = None) -> SplitDataset:
    """An image folder: `path/train/<class>/` (and `path/test/<class>/`) if present, else `path/<class>/`.

    Classes are `classes` if given, else `path/classes.txt`, else the sorted subfolder names. Without a
    test/ folder the test split is split off the training images (stratified, `test_fraction`, `seed`).
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    has_split = (root / "train").is_dir()
    folders = [root / s for s in SPLITS] if has_split else [root]
    classes = list(classes) if classes is not None else _read_classes(root, folders)
    if not classes:
        raise DatasetError(f"{root} has no class folders: expected {root}/<class>/<image> or {root}/train/<class>/")
    samples = readable(load_image_folder(folders[0], classes))
    if has_split and (root / "test").is_dir():
        train, test = samples, readable(load_image_folder(root / "test", classes))
    else:
        labels = np.array([s.label for s in samples], dtype=np.int64)
        train_idx, test_idx = stratified_split(labels, test_fraction, seed)
        train, test = [samples[i] for i in train_idx], [samples[i] for i in test_idx]
    if not train:
        raise DatasetError(f"{root} has no training images for the classes {classes}")
    return SplitDataset(root.name, classes, train, test)
