"""`step`: the whole training step as one plain ONNX graph, run by any onnxruntime.

The trainer owns the LoRA tensors and AdamW moments as OrtValues on the execution device and
feeds each step's outputs straight back as the next step's inputs through IO binding, so no
tensor is copied between steps. Logits come from the bundle's inference model, which takes the
same OrtValues.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..bundle import INFERENCE_MODEL, TRAIN_STEP_MODEL, Bundle
from ..ort import import_onnxruntime, inference_session, resolve_providers, torch_hidden
from ..step_io import STEP_OUTPUTS, moment_names, new_names
from .base import StepResult, Trainer, TrainerError

log = logging.getLogger(__name__)


@dataclass
class StepState:
    """One client's training state in a step trainer (see `StepTrainer.save_state`)."""

    params: List[Any]
    m: List[Any]
    v: List[Any]
    steps: int
    lr: float
    weight_decay: float


class StepTrainer(Trainer):
    name = "step"
    requirement = "onnxruntime"

    def __init__(self, bundle: Bundle, threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None) -> None:
        super().__init__(bundle, threads, providers)
        self._ort = import_onnxruntime()
        try:
            self.providers = resolve_providers(providers)
        except ValueError as exc:
            raise TrainerError(str(exc)) from None
        self._device = "cuda" if self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        self._session = inference_session(bundle.path(TRAIN_STEP_MODEL), threads, self.providers, lean=True)
        self._infer = None  # the inference model, loaded on the first logits() call
        self._names = self.manifest.trainable_names
        self._m_names, self._v_names = moment_names(self._names)
        self._input_name = self._session.get_inputs()[0].name
        expected = [self.manifest.input_kind, "labels", "step", "lr", "weight_decay",
                    *self._names, *self._m_names, *self._v_names]
        got = [i.name for i in self._session.get_inputs()]
        if got != expected:
            raise TrainerError(f"{TRAIN_STEP_MODEL} inputs do not match the manifest (first differences: "
                               f"{[(a, b) for a, b in zip(got, expected) if a != b][:2]})")
        self._outputs = [*STEP_OUTPUTS, *new_names(self._names), *new_names(self._m_names),
                         *new_names(self._v_names)]
        self.steps = 0
        self._params: List = []
        self._m: List = []
        self._v: List = []
        from ..adapter import load_file

        initial = load_file(bundle.path("adapter.safetensors"), self.manifest.trainable)
        self.set_adapter(initial.tensors)
        self.reset_optimizer()

    @classmethod
    def runs_here(cls) -> bool:
        try:
            with torch_hidden():  # find_spec imports the parent package (see edge.ort)
                return importlib.util.find_spec("onnxruntime") is not None
        except ModuleNotFoundError:
            return False

    def _value(self, array: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, np.float32), self._device, 0)

    def reset_optimizer(self) -> None:
        """Zero the AdamW moments and the step count."""
        self._m = [self._value(np.zeros(s.shape, np.float32)) for s in self.manifest.trainable]
        self._v = [self._value(np.zeros(s.shape, np.float32)) for s in self.manifest.trainable]
        self.steps = 0

    def set_weight_decay(self, weight_decay: float) -> bool:
        if weight_decay < 0:
            raise TrainerError(f"weight decay must be >= 0, got {weight_decay}")
        self.weight_decay = float(weight_decay)
        return True

    def _run_step(self, inputs: np.ndarray, labels: np.ndarray, lr: float, weight_decay: float) -> List:
        io = self._session.io_binding()
        io.bind_cpu_input(self._input_name, np.ascontiguousarray(inputs, np.float32))
        io.bind_cpu_input("labels", np.ascontiguousarray(labels, np.int64))
        io.bind_cpu_input("step", np.array(self.steps + 1, np.float32))
        io.bind_cpu_input("lr", np.array(lr, np.float32))
        io.bind_cpu_input("weight_decay", np.array(weight_decay, np.float32))
        for names, values in ((self._names, self._params), (self._m_names, self._m), (self._v_names, self._v)):
            for name, value in zip(names, values):
                io.bind_ortvalue_input(name, value)
        io.bind_output("loss", "cpu")
        io.bind_output("correct", "cpu")
        for name in self._outputs[2:]:
            io.bind_output(name, self._device)
        self._session.run_with_iobinding(io)
        return io.get_outputs()

    def train_step(self, inputs: np.ndarray, labels: np.ndarray) -> StepResult:
        self.check_batch(inputs, labels)
        out = self._run_step(inputs, labels, self.lr, self.weight_decay)
        k = len(self._names)
        loss = float(out[0].numpy())
        if not np.isfinite(loss):
            raise TrainerError(f"training step {self.steps + 1} produced a non-finite loss ({loss})")
        self._params, self._m, self._v = list(out[2 : 2 + k]), list(out[2 + k : 2 + 2 * k]), list(out[2 + 2 * k :])
        self.steps += 1
        return StepResult(loss, int(out[1].numpy()), len(labels))

    def evaluate_batch(self, inputs: np.ndarray, labels: np.ndarray) -> StepResult:
        """Loss and hits with the current adapter: the step graph at lr 0, its outputs discarded
        (no second session with another copy of the frozen weights is needed)."""
        self.check_batch(inputs, labels)
        out = self._run_step(inputs, labels, 0.0, 0.0)
        return StepResult(float(out[0].numpy()), int(out[1].numpy()), len(labels))

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        self.check_batch(inputs)
        if self._infer is None:
            self._infer = inference_session(self.bundle.path(INFERENCE_MODEL), self.threads, self.providers)
        io = self._infer.io_binding()
        io.bind_cpu_input(self.manifest.input_kind, np.ascontiguousarray(inputs, np.float32))
        for name, value in zip(self._names, self._params):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        self._infer.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()

    def get_adapter(self) -> Dict[str, np.ndarray]:
        return {name: np.array(value.numpy(), dtype=np.float32) for name, value in zip(self._names, self._params)}

    def set_adapter(self, tensors: Dict[str, np.ndarray]) -> None:
        self.check_adapter(tensors)
        self._params = [self._value(tensors[name]) for name in self._names]

    def optimizer_state(self) -> Dict[str, np.ndarray]:
        """AdamW moments by `adam_m.<name>` / `adam_v.<name>` (for tests and inspection)."""
        state = {n: v.numpy() for n, v in zip(self._m_names, self._m)}
        state.update({n: v.numpy() for n, v in zip(self._v_names, self._v)})
        return state

    def save_state(self) -> StepState:
        """What makes this trainer one client's: LoRA tensors, AdamW moments, step count, lr, weight decay
        (references to the session's values: a later step makes new ones, never changes these)."""
        return StepState(list(self._params), list(self._m), list(self._v), self.steps, self.lr, self.weight_decay)

    def load_state(self, state: StepState) -> None:
        """Make `state` this trainer's (a swap of references: the step graph takes them as inputs)."""
        self._params, self._m, self._v = list(state.params), list(state.m), list(state.v)
        self.steps, self.lr, self.weight_decay = state.steps, state.lr, state.weight_decay
