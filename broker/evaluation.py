"""Server-side evaluation of each new global adapter on a held-out labelled set (`--eval-data`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict

import numpy as np

from flora.edge.bundle import Bundle
from flora.edge.dataset import DatasetError, load_dataset, report_unreadable, unreadable_images
from flora.edge.evaluate import AdapterEvaluator
from flora.edge.features import readable_image_features
from flora.edge.training import LocalData

log = logging.getLogger("flora.aggregator")


class HeldOutEvaluator:
    """Test accuracy and loss of an adapter; image features are computed once (text-mode bundles). Images that
    cannot be decoded are left out with one warning, as the agent does."""

    def __init__(self, bundle: Bundle, data: Path, threads: int = 0) -> None:
        m = bundle.manifest
        samples = load_dataset(data, list(m.classes))
        if not samples:
            raise DatasetError(f"no evaluation images for the bundle's classes under {data}")
        paths = [s.path for s in samples]
        if m.needs_image_encoder:
            features, bad = readable_image_features(bundle, paths)
        else:
            features, bad = None, unreadable_images(paths)
        report_unreadable(paths, bad)
        kept = [s for i, s in enumerate(samples) if i not in bad]
        if not kept:
            raise DatasetError(f"none of the evaluation images under {data} can be read")
        labels = np.array([s.label for s in kept], dtype=np.int64)
        if features is not None:
            self.data = LocalData(labels, features=features)
        else:
            self.data = LocalData(labels, paths=[s.path for s in kept], preprocess=m.preprocess)
        self.evaluator = AdapterEvaluator(bundle, threads=threads or None)
        self.skipped = len(bad)
        log.info("evaluating every global adapter on %d held-out images from %s%s", len(kept), data,
                 f" ({len(bad)} unreadable left out)" if bad else "")

    def __call__(self, tensors: Dict[str, np.ndarray]) -> Dict[str, float]:
        result = self.evaluator.evaluate(tensors, self.data)
        assert result is not None
        return {"test_accuracy": result.accuracy, "test_loss": result.loss, "test_samples": result.samples}

    def on_round_closed(self, round_: int, tensors: Dict[str, np.ndarray]) -> Dict[str, float]:
        """The aggregator's per-round hook: test the new global."""
        return self(tensors)
