"""The trainer interface every backend implements (the backend choice is trainers/backends.py)."""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from ..bundle import Bundle
from ..errors import FloraError

log = logging.getLogger(__name__)


class TrainerError(FloraError, RuntimeError):
    """A trainer backend cannot run here or was given unusable input."""


@dataclass(frozen=True)
class StepResult:
    loss: float
    correct: int  # arg-max hits in the batch
    count: int


def score_logits(logits: np.ndarray, labels: np.ndarray) -> StepResult:
    """Mean cross-entropy (float64, stable log-softmax) and arg-max hits of logits against labels."""
    z = np.asarray(logits, dtype=np.float64)
    shifted = z - z.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(labels)), labels].mean())
    return StepResult(loss, int((z.argmax(axis=1) == labels).sum()), len(labels))


class Trainer(abc.ABC):
    """Trains a bundle's LoRA tensors with AdamW; reads and writes them by adapter name.

    A backend says itself whether it runs on this machine (`runs_here`), what it needs where it does
    not (`requirement`), whether it can change the weight decay (`set_weight_decay`) and how it
    starts AdamW afresh (`reset_optimizer`).
    """

    name: str
    #: what this backend needs to run, for the error where it cannot
    requirement: str = ""

    def __init__(self, bundle: Bundle, threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.threads = threads
        self.lr = 1e-3
        self.weight_decay = self.manifest.optimizer.weight_decay

    @classmethod
    @abc.abstractmethod
    def runs_here(cls) -> bool:
        """Whether this machine has the runtime the backend needs (nothing is loaded for it)."""

    @abc.abstractmethod
    def train_step(self, inputs: np.ndarray, labels: np.ndarray) -> StepResult:
        """One forward/backward/AdamW update on a batch."""

    @abc.abstractmethod
    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """Logits (N, C) with the current LoRA tensors, no update."""

    def evaluate_batch(self, inputs: np.ndarray, labels: np.ndarray) -> StepResult:
        """Mean cross-entropy and arg-max hits of the current adapter on a batch (no update)."""
        self.check_batch(inputs, labels)
        return score_logits(self.logits(inputs), labels)

    @abc.abstractmethod
    def get_adapter(self) -> Dict[str, np.ndarray]:
        """The current LoRA tensors (float32 copies), by adapter name."""

    @abc.abstractmethod
    def set_adapter(self, tensors: Dict[str, np.ndarray]) -> None:
        """Load LoRA tensors into the live session (no session rebuild)."""

    def set_lr(self, lr: float) -> None:
        if not lr > 0:
            raise TrainerError(f"learning rate must be > 0, got {lr}")
        self.lr = float(lr)

    @abc.abstractmethod
    def set_weight_decay(self, weight_decay: float) -> bool:
        """Use this AdamW weight decay from the next step on; False if the backend cannot change it (it then
        keeps `self.weight_decay`, the value the bundle was exported with)."""

    @abc.abstractmethod
    def reset_optimizer(self) -> None:
        """Start AdamW afresh (zero moments, step count 0), keeping the current LoRA tensors and lr."""

    def check_batch(self, inputs: np.ndarray, labels: Optional[np.ndarray] = None) -> None:
        want = self.manifest.input_shape(inputs.shape[0] if inputs.ndim else 0)
        if tuple(inputs.shape) != want or inputs.shape[0] == 0:
            raise TrainerError(f"batch input has shape {list(inputs.shape)}, expected {list(want)} with batch >= 1")
        if labels is not None:
            if labels.shape != (inputs.shape[0],):
                raise TrainerError(f"labels have shape {list(labels.shape)}, expected [{inputs.shape[0]}]")
            if labels.size and (labels.min() < 0 or labels.max() >= self.manifest.num_classes):
                raise TrainerError(f"labels must lie in [0, {self.manifest.num_classes})")

    def check_adapter(self, tensors: Dict[str, np.ndarray]) -> None:
        specs = self.manifest.spec_by_name
        if set(tensors) != set(specs):
            missing = sorted(set(specs) - set(tensors))[:3]
            extra = sorted(set(tensors) - set(specs))[:3]
            raise TrainerError(f"adapter does not match the bundle: missing {missing}, unexpected {extra}")
        for name, arr in tensors.items():
            if tuple(arr.shape) != specs[name].shape:
                raise TrainerError(
                    f"adapter tensor {name} has shape {list(arr.shape)}, expected {list(specs[name].shape)}"
                )
