"""Trainer backends: `ort-training` (ONNX Runtime's on-device training API) and `step` (one plain
ONNX graph per training step, for devices where only plain onnxruntime installs)."""

from __future__ import annotations

from .backends import TRAINERS, available_backends, choose_backend, open_bundle, open_trainer
from .base import StepResult, Trainer, TrainerError

__all__ = ["TRAINERS", "StepResult", "Trainer", "TrainerError", "available_backends", "choose_backend",
           "open_bundle", "open_trainer"]
