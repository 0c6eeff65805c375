"""A device's own labelled images: an image folder (one subfolder per class) or a `path,label` CSV.

Labels are indices into the bundle's class list (`Manifest.classes`). Helpers pick K images per
class (few-shot) and split off a stratified validation set; both are seeded and keep the input order.
`split_local` does both in the agent's order: the validation split first, then K per class.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .errors import FloraError
from .fileio import PathLike

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class DatasetError(FloraError, ValueError):
    """The local dataset is missing, malformed or does not fit the bundle's classes."""


@dataclass(frozen=True)
class Sample:
    """One labelled image: its file and its index in the bundle's class list."""

    path: Path
    label: int


def is_image_file(path: Path) -> bool:
    """An image by its extension (case-insensitive), and not hidden."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _visible_files(folder: Path) -> List[Path]:
    """Files under `folder`, recursively, skipping hidden files and folders; sorted."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def load_image_folder(root: PathLike, classes: Sequence[str]) -> List[Sample]:
    """`root/<class name>/**/<image>`, by class index then path; every folder must name a class of the bundle.

    A class without a folder, or with no images, is allowed (a device need not see every class) and logged.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    index = {name: i for i, name in enumerate(classes)}
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    folders = [p for p in entries if p.is_dir()]
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        hint = {u: c for u in unknown for c in classes if u.lower() == c.lower()}
        raise DatasetError(
            f"{root} has folders that are not classes of the bundle: {unknown}"
            + (f" (class names are case-sensitive: {hint})" if hint else "")
            + f"; the bundle's classes are {list(classes)}"
        )
    stray = [p.name for p in entries if p.is_file() and is_image_file(p)]
    if stray:
        log.warning("%d images directly in %s are ignored (no class folder): %s", len(stray), root, stray[:5])
    samples: List[Sample] = []
    for folder in sorted(folders, key=lambda p: index[p.name]):
        files = _visible_files(folder)
        images = [p for p in files if is_image_file(p)]
        skipped = Counter(p.suffix.lower() or p.name for p in files if not is_image_file(p))
        if skipped:
            log.warning("skipped %d files that are not images (%s) in %s; images are %s",
                        sum(skipped.values()), dict(skipped), folder, " ".join(IMAGE_EXTENSIONS))
        if not images:
            log.warning("class %r has no images in %s", folder.name, folder)
        samples.extend(Sample(p, index[folder.name]) for p in images)
    missing = [c for c in classes if c not in {p.name for p in folders}]
    if missing:
        log.info("no folder for classes %s in %s: this device has no images of them", missing, root)
    return samples


def _label(text: str, index: Dict[str, int], num_classes: int) -> int:
    """A class name, or else a class index; -1 when it is neither."""
    if text in index:
        return index[text]
    if text.isascii() and text.isdigit() and int(text) < num_classes:
        return int(text)
    return -1


def load_csv(path: PathLike, classes: Sequence[str]) -> List[Sample]:
    """Rows `path,label`, in file order.

    `label` is a class name or a class index (a name wins); relative paths are relative to the CSV's
    folder; extra columns are ignored; blank lines and lines starting with `#` are skipped. The first
    line is a header when its label is not a class and its path is not a file (`path,label`, `file,class`).
    """
    path = Path(path)
    index = {name: i for i, name in enumerate(classes)}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read {path} as a CSV file: {exc}") from exc
    samples: List[Sample] = []
    unknown: Dict[str, List[int]] = {}  # label: its line numbers, reported together
    first = True
    for line_no, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        is_first, first = first, False
        if len(cells) < 2 or not cells[0] or not cells[1]:
            raise DatasetError(f"{path}:{line_no}: expected 'path,label', got {row}")
        image = path.parent / Path(cells[0]).expanduser()  # an absolute path stays absolute
        label = _label(cells[1], index, len(classes))
        if label < 0 and is_first and not image.is_file():
            log.debug("%s:%d taken as the header: %s", path, line_no, row)
            continue
        if label < 0:
            unknown.setdefault(cells[1], []).append(line_no)
            continue
        if not image.is_file():
            raise DatasetError(f"{path}:{line_no}: image {image} does not exist")
        samples.append(Sample(image, label))
    if unknown:
        raise DatasetError(_unknown_labels_message(path, unknown, classes))
    return samples


def _unknown_labels_message(path: Path, unknown: Dict[str, List[int]], classes: Sequence[str]) -> str:
    """All the labels that are not classes, with their lines (the first line leads the message)."""
    first_line = min(lines[0] for lines in unknown.values())
    what = f"neither a class of the bundle {list(classes)} nor a class index 0..{len(classes) - 1}"
    if len(unknown) == 1 and len(next(iter(unknown.values()))) == 1:
        return f"{path}:{first_line}: label {next(iter(unknown))!r} is {what}"
    listed = ", ".join(f"{label!r} (line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines[:5]))}"
                       f"{', ...' if len(lines) > 5 else ''})" for label, lines in unknown.items())
    return f"{path}:{first_line}: {len(unknown)} labels are {what}: {listed}"


def load_dataset(path: PathLike, classes: Sequence[str]) -> List[Sample]:
    """A CSV file or an image folder, by what `path` is."""
    p = Path(path)
    if p.is_dir():
        return load_image_folder(p, classes)
    if p.is_file():
        if is_image_file(p):
            raise DatasetError(f"{p} is an image; give an image folder (one subfolder per class) or a CSV file")
        return load_csv(p, classes)
    raise DatasetError(f"dataset {p} does not exist: give an image folder (one subfolder per class) or a CSV file")


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted index arrays (kept, split off): `round(fraction * N)` split off, spread over the classes.

    Each class gives `fraction` of its samples, rounded by largest remainder so that the total is
    right even when every class is small; a class with n >= 2 samples keeps at least one, a class
    with one sample keeps it.
    """
    labels = np.asarray(labels)
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"the split fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    values, counts = np.unique(labels, return_counts=True)
    exact = fraction * counts
    cap = counts - 1
    take = np.minimum(np.floor(exact).astype(np.int64), cap)
    extra = round(fraction * len(labels)) - int(take.sum())
    # largest remainder first, ties in a seeded order; only classes below their cap
    order = np.lexsort((rng.permutation(len(values)), -(exact - np.floor(exact))))
    for i in order:
        if extra <= 0:
            break
        if take[i] < cap[i]:
            take[i] += 1
            extra -= 1
    split: List[np.ndarray] = []
    for value, n in zip(values, take):
        members = np.flatnonzero(labels == value)
        split.append(rng.permutation(members)[:n])
    mask = np.zeros(len(labels), dtype=bool)
    if split:
        mask[np.concatenate(split)] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def few_shot(samples: Sequence[Sample], k: int, seed: int) -> List[Sample]:
    """K samples per class (seeded), in their input order; a class with fewer than K keeps them all."""
    if k < 1:
        raise DatasetError(f"few-shot K must be >= 1, got {k}")
    labels = np.array([s.label for s in samples], dtype=np.int64)
    rng = np.random.default_rng(seed)
    keep: List[np.ndarray] = []
    short: Dict[int, int] = {}
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < k:
            short[int(label)] = len(members)
        keep.append(rng.permutation(members)[:k])
    if short:
        log.info("classes with fewer than %d images keep them all: %s (class index: images)", k, short)
    chosen = np.sort(np.concatenate(keep)) if keep else np.array([], dtype=np.int64)
    return [samples[i] for i in chosen]


def train_val_split(samples: Sequence[Sample], fraction: float, seed: int) -> Tuple[List[Sample], List[Sample]]:
    """Stratified split (see `stratified_split`): about `fraction` to validation, input order kept.

    `fraction` 0 gives an empty validation list; every class with two or more samples keeps at least
    one for training.
    """
    labels = np.array([s.label for s in samples], dtype=np.int64)
    train_idx, val_idx = stratified_split(labels, fraction, seed)
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


def split_local(samples: Sequence[Sample], val_fraction: float, shots: Optional[int],
                seed: int) -> Tuple[List[Sample], List[Sample]]:
    """A device's (training, validation) lists: the stratified validation split is taken from all
    images first, then `shots` training images per class are kept (seeded; None keeps them all),
    so few-shot training gets K per class wherever a class has K left after the split."""
    train, val = train_val_split(samples, val_fraction, seed)
    if shots:
        train = few_shot(train, shots, seed)
    return train, val


def unreadable_images(paths: Sequence[PathLike],
                      progress: Optional[Callable[[int, int], None]] = None) -> Dict[int, str]:
    """{index: reason} of the files Pillow cannot decode (a full decode; JPEGs at reduced scale).

    `progress(done, total)` is called after every image.
    """
    bad: Dict[int, str] = {}
    for i, path in enumerate(paths):
        if progress is not None and i:
            progress(i, len(paths))
        try:
            with Image.open(path) as img:
                img.draft(img.mode, (1, 1))  # JPEG: decode at 1/8 scale; the whole stream is still read
                img.load()
        except Exception as exc:  # Pillow raises many types for a broken file
            bad[i] = f"{type(exc).__name__}: {exc}"
    if progress is not None and paths:
        progress(len(paths), len(paths))
    return bad


def report_unreadable(paths: Sequence[PathLike], bad: Mapping[int, str], first: int = 5) -> None:
    """One warning naming the unreadable images: how many, the first few paths, the first reason."""
    if not bad:
        return
    idx = sorted(bad)
    names = ", ".join(str(paths[i]) for i in idx[:first]) + (", ..." if len(idx) > first else "")
    log.warning("%d of %d images cannot be read and are left out: %s (first reason: %s)",
                len(idx), len(paths), names, bad[idx[0]])
