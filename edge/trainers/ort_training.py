"""`ort-training`: ONNX Runtime's on-device training API on the bundle's artifacts."""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import numpy as np

from ..bundle import CHECKPOINT, EVAL_MODEL, OPTIMIZER_MODEL, TRAINING_MODEL, Bundle
from ..ort import has_training_api, import_onnxruntime, import_training_api, share_cpu_arena
from .base import StepResult, Trainer, TrainerError


class OrtTrainingTrainer(Trainer):
    """Module + Optimizer over the checkpoint; LoRA tensors are the only trainable parameters.

    AdamW's moments live in the checkpoint state and persist across rounds; the training API has
    no call to reset them, so `reset_optimizer` reopens the session. The weight decay is baked into
    the exported optimizer graph. CPU only: `providers` is for the step backend.
    """

    name = "ort-training"
    requirement = "onnxruntime-training (x86-64 Linux, Windows or macOS, Python 3.8-3.12)"

    def __init__(self, bundle: Bundle, threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None) -> None:
        super().__init__(bundle, threads, providers)
        self._open()

    @classmethod
    def runs_here(cls) -> bool:
        return has_training_api()

    def _open(self) -> None:
        """Load the checkpoint (initial adapter, fresh AdamW state) into new Module and Optimizer sessions."""
        ort = import_onnxruntime()
        api = import_training_api()
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        share_cpu_arena(options)
        bundle = self.bundle
        self._state = api.CheckpointState.load_checkpoint(os.fspath(bundle.path(CHECKPOINT)))
        self._module = api.Module(
            os.fspath(bundle.path(TRAINING_MODEL)),
            self._state,
            os.fspath(bundle.path(EVAL_MODEL)),
            session_options=options,
        )
        self._optimizer = api.Optimizer(os.fspath(bundle.path(OPTIMIZER_MODEL)), self._module)
        trainable = sorted(name for name, p in self._state.parameters if p.requires_grad)
        if trainable != sorted(self.manifest.trainable_names):
            raise TrainerError("the checkpoint's trainable parameters differ from the manifest's LoRA list")
        self.set_lr(self.lr)

    def reset_optimizer(self) -> None:
        """Reopen the sessions (the only way to zero AdamW's moments here), then restore the adapter and lr."""
        tensors = self.get_adapter()
        del self._optimizer, self._module, self._state  # free the old sessions before the new ones are built
        self._open()
        self.set_adapter(tensors)

    def set_weight_decay(self, weight_decay: float) -> bool:
        return abs(weight_decay - self.weight_decay) < 1e-12

    def set_lr(self, lr: float) -> None:
        super().set_lr(lr)
        self._optimizer.set_learning_rate(self.lr)

    def train_step(self, inputs: np.ndarray, labels: np.ndarray) -> StepResult:
        self.check_batch(inputs, labels)
        self._module.train()
        loss, logits = self._module(np.ascontiguousarray(inputs, np.float32), labels.astype(np.int64))
        self._optimizer.step()
        self._module.lazy_reset_grad()
        return StepResult(float(loss), int((logits.argmax(axis=1) == labels).sum()), len(labels))

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        self.check_batch(inputs)
        self._module.eval()
        dummy = np.zeros(inputs.shape[0], dtype=np.int64)
        _, logits = self._module(np.ascontiguousarray(inputs, np.float32), dummy)
        return logits

    def get_adapter(self) -> Dict[str, np.ndarray]:
        return {name: np.array(self._state.parameters[name].data, dtype=np.float32)
                for name in self.manifest.trainable_names}

    def set_adapter(self, tensors: Dict[str, np.ndarray]) -> None:
        self.check_adapter(tensors)
        for name in self.manifest.trainable_names:
            self._state.parameters[name] = np.ascontiguousarray(tensors[name], dtype=np.float32)
