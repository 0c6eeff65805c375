"""Many clients, one ONNX Runtime session: the virtual clients of a simulation process share one step trainer.

`SharedStepTrainer` holds the process's only `StepTrainer` (one copy of the frozen weights, one session).
Each client gets a `ClientTrainer`, the Trainer interface with its own LoRA tensors, AdamW moments, step
count, lr and weight decay: before every call it makes its state the session's, which is a swap of
references (the step graph takes weights and moments as inputs and returns new ones), so nothing is
copied and no client ever trains on another's weights or moments. One thread at a time.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from ..bundle import Bundle
from .base import StepResult, Trainer
from .step import StepState, StepTrainer


class SharedStepTrainer:
    """The one step trainer of a process, lent to its clients in turn."""

    def __init__(self, bundle: Bundle, threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None) -> None:
        self.trainer = StepTrainer(bundle, threads=threads, providers=providers)
        self._fresh = self.trainer.save_state()  # the bundle's initial adapter, zero moments, step 0
        self._owner: Optional[ClientTrainer] = None
        self.swaps = 0

    def client(self) -> ClientTrainer:
        """A new client's trainer: the bundle's initial adapter, fresh AdamW moments."""
        return ClientTrainer(self, self._fresh)

    def _lend(self, client: ClientTrainer) -> StepTrainer:
        if self._owner is not client:
            if self._owner is not None:
                self._owner._state = self.trainer.save_state()
            self.trainer.load_state(client._state)
            self._owner = client
            self.swaps += 1
        return self.trainer


class ClientTrainer(Trainer):
    """One client's view of the shared step trainer (the `step` backend, with this client's state)."""

    name = StepTrainer.name
    requirement = StepTrainer.requirement

    def __init__(self, shared: SharedStepTrainer, state: StepState) -> None:
        super().__init__(shared.trainer.bundle)
        self._shared = shared
        self._state = state

    @classmethod
    def runs_here(cls) -> bool:
        return StepTrainer.runs_here()

    @property
    def _t(self) -> StepTrainer:
        return self._shared._lend(self)

    def train_step(self, inputs: np.ndarray, labels: np.ndarray) -> StepResult:
        return self._t.train_step(inputs, labels)

    def evaluate_batch(self, inputs: np.ndarray, labels: np.ndarray) -> StepResult:
        return self._t.evaluate_batch(inputs, labels)

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        return self._t.logits(inputs)

    def get_adapter(self) -> Dict[str, np.ndarray]:
        return self._t.get_adapter()

    def set_adapter(self, tensors: Dict[str, np.ndarray]) -> None:
        self._t.set_adapter(tensors)

    def set_lr(self, lr: float) -> None:
        self._t.set_lr(lr)

    def set_weight_decay(self, weight_decay: float) -> bool:
        return self._t.set_weight_decay(weight_decay)

    def reset_optimizer(self) -> None:
        self._t.reset_optimizer()

    def optimizer_state(self) -> Dict[str, np.ndarray]:
        return self._t.optimizer_state()

    @property
    def steps(self) -> int:
        return self._t.steps
