"""Evaluate any adapter on labelled inputs with the bundle's inference model (no training runtime needed).

The simulator uses it for the global model on a held-out test split after every round; a device can
use it to check an adapter before deploying it.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from .bundle import INFERENCE_MODEL, Bundle
from .ort import inference_session
from .trainers.base import StepResult, score_logits
from .training import Evaluation, LocalData, evaluate


class AdapterEvaluator:
    """Logits of the bundle's classifier for given LoRA tensors (graph inputs of inference_model.onnx)."""

    def __init__(self, bundle: Bundle, threads: Optional[int] = None, providers: Optional[List[str]] = None) -> None:
        self.manifest = bundle.manifest
        self._session = inference_session(bundle.path(INFERENCE_MODEL), threads, providers)
        self._tensors: Dict[str, np.ndarray] = {}

    def set_adapter(self, tensors: Dict[str, np.ndarray]) -> None:
        missing = sorted(set(self.manifest.trainable_names) - set(tensors))
        if missing:
            raise ValueError(f"adapter lacks {missing[:3]}")
        self._tensors = {n: np.ascontiguousarray(tensors[n], np.float32) for n in self.manifest.trainable_names}

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        if not self._tensors:
            raise ValueError("no adapter set")
        feeds = {self.manifest.input_kind: np.ascontiguousarray(inputs, np.float32), **self._tensors}
        return self._session.run(None, feeds)[0]

    def evaluate_batch(self, inputs: np.ndarray, labels: np.ndarray) -> StepResult:
        return score_logits(self.logits(inputs), labels)

    def evaluate(self, tensors: Dict[str, np.ndarray], data: LocalData, batch_size: int = 256) -> Optional[Evaluation]:
        self.set_adapter(tensors)
        return evaluate(self, data, batch_size)
