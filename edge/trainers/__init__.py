"""Trainer backends: `ort-training` (ONNX Runtime's on-device training API) and `step` (one plain
ONNX graph per training step, for devices where only plain onnxruntime installs)."""

from __future__ import annotations

from .base import StepResult, Trainer, TrainerError, available_backends, open_trainer

__all__ = ["StepResult", "Trainer", "TrainerError", "available_backends", "open_trainer"]
