"""Server-side evaluation of each new global adapter on a held-out labelled set (`--eval-data`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict

import numpy as np

from flora.edge.bundle import Bundle
from flora.edge.dataset import load_dataset
from flora.edge.evaluate import AdapterEvaluator
from flora.edge.features import image_features
from flora.edge.training import LocalData

log = logging.getLogger("flora.aggregator")


class HeldOutEvaluator:
    """Test accuracy and loss of an adapter; image features are computed once (text-mode bundles)."""

    def __init__(self, bundle: Bundle, data: Path, threads: int = 0) -> None:
        m = bundle.manifest
        samples = load_dataset(data, list(m.classes))
        if not samples:
            raise ValueError(f"no evaluation images for the bundle's classes under {data}")
        labels = np.array([s.label for s in samples], dtype=np.int64)
        paths = [s.path for s in samples]
        if m.needs_image_encoder:
            self.data = LocalData(labels, features=image_features(bundle, paths))
        else:
            self.data = LocalData(labels, paths=paths, preprocess=m.preprocess)
        self.evaluator = AdapterEvaluator(bundle, threads=threads or None)
        log.info("evaluating every global adapter on %d held-out images from %s", len(samples), data)

    def __call__(self, tensors: Dict[str, np.ndarray]) -> Dict[str, float]:
        result = self.evaluator.evaluate(tensors, self.data)
        assert result is not None
        return {"test_accuracy": result.accuracy, "test_loss": result.loss, "test_samples": result.samples}

    def on_round_closed(self, round_: int, tensors: Dict[str, np.ndarray]) -> Dict[str, float]:
        """The aggregator's per-round hook: test the new global."""
        return self(tensors)
