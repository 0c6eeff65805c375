"""The device's own images as a trainer's inputs: the validation split, then --shots per class; unreadable
images left out with one warning; in text mode each image's features computed once, through the cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .bundle import Bundle, Manifest
from .dataset import DatasetError, Sample, load_dataset, report_unreadable, split_local, unreadable_images
from .features import FeatureCache, ProgressMeter, readable_image_features
from .training import LocalData

log = logging.getLogger("flora.agent")


@dataclass(frozen=True)
class DeviceData:
    """The local training and validation splits."""

    train: LocalData
    val: LocalData


def load_device_data(root: Path, bundle: Bundle, cache_dir: Path, *, shots: Optional[int] = None,
                     val_fraction: float = 0.1, seed: int = 0, feature_batch_size: int = 32,
                     threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                     progress_every_s: float = 5.0, image_encoder_int8: bool = False) -> DeviceData:
    """The images under `root` (class folders or a path,label CSV) for the bundle's classes, split and
    checked (the `flora-agent run` options of the same names); features (text mode) through
    `cache_dir`/features.sqlite, from the int8 image encoder with `image_encoder_int8`. Raises DatasetError."""
    manifest = bundle.manifest
    samples = load_dataset(root, list(manifest.classes))
    if not samples:
        raise DatasetError(f"no images for the bundle's classes under {root}")
    train, val = split_local(samples, val_fraction, shots, seed)
    paths = [s.path for s in train + val]
    if manifest.needs_image_encoder:  # text mode: image features once per image, cached on disk
        feats, bad = _features(bundle, paths, cache_dir / "features.sqlite", batch_size=feature_batch_size,
                               threads=threads, providers=providers, progress_every_s=progress_every_s,
                               int8=image_encoder_int8)
    else:  # pixels are decoded batch by batch while training: check once that they decode
        feats, bad = None, _check_decodable(paths, progress_every_s)
    report_unreadable(paths, bad)
    train, val = _without(train, bad, 0), _without(val, bad, len(train))
    if not train:
        raise DatasetError(f"none of the training images under {root} can be read")
    log.info("data %s: %d training and %d validation images%s", root, len(train), len(val),
             f" (--shots {shots}: at most {shots} per class for training)" if shots else "")
    if feats is None:
        return DeviceData(_pixel_data(train, manifest), _pixel_data(val, manifest))
    return DeviceData(LocalData(_labels(train), features=feats[: len(train)]),
                      LocalData(_labels(val), features=feats[len(train):]))


def _features(bundle: Bundle, paths: List[Path], cache_file: Path, **options) -> Tuple[np.ndarray, Dict[int, str]]:
    """Features of the readable images, through the cache (pruned of other models' entries first)."""
    cache = FeatureCache(cache_file)
    try:
        dropped = cache.prune(bundle.manifest.model_id)
        if dropped:
            log.info("feature cache: dropped %d entries of other models", dropped)
        return readable_image_features(bundle, paths, cache, **options)
    finally:
        cache.close()


def _check_decodable(paths: List[Path], progress_every_s: float) -> Dict[int, str]:
    log.info("checking that the %d images decode", len(paths))
    meter = ProgressMeter("decode check", len(paths), progress_every_s)
    return unreadable_images(paths, progress=lambda done, total: meter.update(done))


def _labels(samples: List[Sample]) -> np.ndarray:
    return np.array([s.label for s in samples], dtype=np.int64)


def _pixel_data(samples: List[Sample], manifest: Manifest) -> LocalData:
    """Images decoded batch by batch while training (vision mode)."""
    return LocalData(_labels(samples), paths=[s.path for s in samples], preprocess=manifest.preprocess)


def _without(samples: List[Sample], bad: Dict[int, str], offset: int) -> List[Sample]:
    """`samples` less those whose index + offset is in `bad`."""
    return [s for i, s in enumerate(samples) if i + offset not in bad]
