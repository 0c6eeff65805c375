"""The trainer interface both backends implement, and the backend choice."""

from __future__ import annotations

import abc
import importlib.util
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..bundle import Bundle, BundleError
from ..errors import FloraError
from ..ort import has_training_api, torch_hidden

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
    """Trains a bundle's LoRA tensors with AdamW; reads and writes them by adapter name."""

    name: str

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.lr = 1e-3

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

    def set_weight_decay(self, weight_decay: float) -> bool:
        """Returns False if this backend cannot change weight decay (fixed at export)."""
        return abs(weight_decay - self.manifest.optimizer.weight_decay) < 1e-12

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


def _importable(module: str) -> bool:
    try:
        with torch_hidden():  # find_spec imports the parent package (see edge.ort)
            return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def available_backends(bundle: Bundle) -> List[str]:
    """Backends that both this machine and this bundle support, preferred first."""
    found = []
    if bundle.has("ort-training") and has_training_api():
        found.append("ort-training")
    if bundle.has("step") and _importable("onnxruntime"):
        found.append("step")
    return found


def open_trainer(
    bundle: Bundle,
    backend: str = "auto",
    *,
    threads: Optional[int] = None,
    providers: Optional[Sequence[str]] = None,
) -> Trainer:
    """`ort-training` where onnxruntime-training imports and the bundle has its artifacts, else `step`."""
    usable = available_backends(bundle)
    if backend == "auto":
        if not usable:
            raise TrainerError(
                f"no trainer backend can run bundle {bundle.root} here: it holds {list(bundle.manifest.backends)}; "
                "ort-training needs onnxruntime-training (x86-64 Linux, Windows or macOS, Python 3.8-3.12), "
                "step needs onnxruntime and a bundle exported with --backend step or all"
            )
        backend = usable[0]
    if backend not in ("ort-training", "step"):
        raise TrainerError(f"unknown trainer backend {backend!r}; use auto, ort-training or step")
    if backend not in usable:
        why = "the bundle was not exported with it" if not bundle.has(backend) else "its runtime is not installed"
        raise TrainerError(f"backend {backend!r} cannot run here: {why}")
    try:
        if backend == "ort-training":
            from .ort_training import OrtTrainingTrainer

            return OrtTrainingTrainer(bundle, threads=threads)
        from .step import StepTrainer

        return StepTrainer(bundle, threads=threads, providers=providers)
    except BundleError:
        raise
    except Exception as exc:
        raise TrainerError(f"cannot start the {backend} trainer: {exc}") from exc
