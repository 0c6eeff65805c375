"""A device's own labelled images: an image folder (one subfolder per class) or a path,label CSV."""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .fileio import PathLike
from .preprocess import is_image_file

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """The local dataset is missing or does not fit the bundle's classes."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


def load_image_folder(root: PathLike, classes: Sequence[str]) -> List[Sample]:
    """`root/<class name>/<image>`; folders must be class names of the bundle."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    index = {name: i for i, name in enumerate(classes)}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        raise DatasetError(
            f"{root} has folders that are not classes of the bundle: {unknown}; "
            f"the bundle's classes are {list(classes)}"
        )
    samples: List[Sample] = []
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
        if not files:
            log.warning("class %r has no images in %s", folder.name, folder)
        samples.extend(Sample(p, index[folder.name]) for p in files)
    missing = sorted(set(classes) - {p.name for p in folders})
    if missing:
        log.info("no folder for classes %s in %s: this device has no images of them", missing, root)
    return samples


def load_csv(path: PathLike, classes: Sequence[str]) -> List[Sample]:
    """Rows `path,label` (a header row is allowed); label is a class name or index; paths relative to the CSV."""
    path = Path(path)
    index = {name: i for i, name in enumerate(classes)}
    samples: List[Sample] = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    for line_no, row in enumerate(rows, start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if line_no == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
            continue
        if len(row) < 2:
            raise DatasetError(f"{path}:{line_no}: expected 'path,label', got {row}")
        rel, label_text = row[0].strip(), row[1].strip()
        if label_text in index:
            label = index[label_text]
        elif label_text.isdigit() and int(label_text) < len(classes):
            label = int(label_text)
        else:
            raise DatasetError(f"{path}:{line_no}: label {label_text!r} is not a class of the bundle {list(classes)}")
        image = Path(rel) if Path(rel).is_absolute() else path.parent / rel
        if not image.is_file():
            raise DatasetError(f"{path}:{line_no}: image {image} does not exist")
        samples.append(Sample(image, label))
    return samples


def load_dataset(path: PathLike, classes: Sequence[str]) -> List[Sample]:
    """A CSV file or an image folder, by what `path` is."""
    p = Path(path)
    if p.is_file():
        return load_csv(p, classes)
    return load_image_folder(p, classes)


def by_class(samples: Sequence[Sample]) -> Dict[int, List[Sample]]:
    groups: Dict[int, List[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.label].append(s)
    return dict(sorted(groups.items()))


def few_shot(samples: Sequence[Sample], shots: int, seed: int) -> List[Sample]:
    """K images per class (seeded); a class with fewer keeps them all."""
    if shots < 1:
        raise DatasetError(f"shots must be >= 1, got {shots}")
    rng = np.random.default_rng(seed)
    kept: List[Sample] = []
    for label, group in by_class(samples).items():
        if len(group) < shots:
            log.info("class %d has %d images, fewer than %d shots: keeping all", label, len(group), shots)
            kept.extend(group)
        else:
            kept.extend(group[i] for i in sorted(rng.choice(len(group), shots, replace=False)))
    return kept


def train_val_split(samples: Sequence[Sample], fraction: float, seed: int) -> Tuple[List[Sample], List[Sample]]:
    """Stratified split: about `fraction` of each class to validation, at least one image kept for training."""
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"validation fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    train: List[Sample] = []
    val: List[Sample] = []
    for group in by_class(samples).values():
        n_val = min(round(fraction * len(group)), len(group) - 1)
        order = rng.permutation(len(group))
        val.extend(group[i] for i in sorted(order[:n_val]))
        train.extend(group[i] for i in sorted(order[n_val:]))
    return train, val
