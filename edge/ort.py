"""Import onnxruntime the way a device should: without torch.

onnxruntime-training 1.19.2 (its last release) ties itself to torch in two places:

- `import onnxruntime` imports ORTModule, which imports torch whenever torch is installed (a
  workstation, the simulator's machine): 1.5 s and about 530 MiB of resident memory for a library
  the agent never uses. Hiding torch while onnxruntime imports makes ORTModule report itself
  unavailable, which onnxruntime treats as a normal case.
- `onnxruntime.training/__init__.py` imports its `optim` and `amp` packages, which import torch
  unconditionally, so on a device without torch `import onnxruntime.training.api` fails
  (microsoft/onnxruntime#22070, open). The `api` subpackage itself (CheckpointState, Module,
  Optimizer) needs only the C bindings; it is imported here under a bare `onnxruntime.training`
  package object that has the real package's path but skips that `__init__`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import types
from types import ModuleType
from typing import Iterator, List, Optional, Sequence

from .errors import ConfigError

log = logging.getLogger(__name__)
_shared_arena: Optional[bool] = None  # None: not tried yet in this process

@contextlib.contextmanager
def torch_hidden() -> Iterator[None]:
    """Make `import torch` raise ImportError for the block, unless torch is already imported."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if hide:
            del sys.modules["torch"]


def import_onnxruntime() -> ModuleType:
    with torch_hidden():
        return importlib.import_module("onnxruntime")


def import_training_api() -> ModuleType:
    """onnxruntime.training.api (CheckpointState, Module, Optimizer), torch or not."""
    ort = import_onnxruntime()
    if "onnxruntime.training" not in sys.modules:
        path = os.path.join(os.path.dirname(ort.__file__), "training")
        if not os.path.isdir(os.path.join(path, "api")):
            raise ImportError("this onnxruntime has no training API (install onnxruntime-training)")
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = [path]  # submodules import from the real folder; its __init__ is skipped
        package.__package__ = "onnxruntime.training"
        sys.modules["onnxruntime.training"] = package
    with torch_hidden():
        return importlib.import_module("onnxruntime.training.api")


def has_training_api() -> bool:
    try:
        ort = import_onnxruntime()
    except ImportError:
        return False
    return os.path.isdir(os.path.join(os.path.dirname(ort.__file__), "training", "api"))


PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


def resolve_providers(requested: Optional[Sequence[str]]) -> List[str]:
    """Map short names (cpu, cuda, tensorrt) to ONNX Runtime providers; CPU is always the fallback."""
    if not requested:
        return ["CPUExecutionProvider"]
    available = import_onnxruntime().get_available_providers()
    chosen = []
    for name in requested:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise ConfigError(f"execution provider {name!r} is not available here; available: {available}")
        chosen.append(full)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def share_cpu_arena(options) -> bool:
    """Let a session allocate from one process-wide CPU arena that grows by what is asked.

    ONNX Runtime gives each session its own arena, which grows in powers of two and never shrinks:
    the ViT-B/32 step graph of both towers at batch 32 jumped from 1873 to 2790 MiB at its fourth
    step, and an agent in text mode held the image encoder's arena next to the trainer's. One shared
    arena with the `kSameAsRequested` extend strategy kept that step at 1834 MiB, and the sessions
    of a process reuse each other's memory (bench/results/train_step.md). Returns False (the session
    keeps its own arena) where this onnxruntime cannot register one.
    """
    global _shared_arena
    ort = import_onnxruntime()
    if _shared_arena is None:
        try:
            same_as_requested = 1  # ArenaExtendStrategy; 0 is kNextPowerOfTwo
            config = ort.OrtArenaCfg(0, same_as_requested, -1, -1)
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, config)
            _shared_arena = True
        except (AttributeError, RuntimeError, TypeError) as exc:  # an onnxruntime without the API
            log.debug("no shared CPU arena (%s); sessions keep their own", exc)
            _shared_arena = False
    if _shared_arena:
        options.add_session_config_entry("session.use_env_allocators", "1")
    return _shared_arena


def inference_session(path, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                      lean: bool = False):
    """An onnxruntime InferenceSession with `threads` intra-op threads on the resolved providers.

    `lean` is for the training step graph, whose frozen weights are used both as they are (backward)
    and transposed (forward): ONNX Runtime's constant folding would keep a transposed copy of each,
    and weight prepacking another. Without both, the ViT-B/32 text-tower step session peaks at
    355 MiB instead of 644 MiB, for about 5 % more time a step (210 ms instead of 195 ms at batch 32
    on the 2-core build machine).
    """
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    share_cpu_arena(options)
    disabled = None
    if lean:
        options.add_session_config_entry("session.disable_prepacking", "1")
        disabled = ["ConstantFolding"]
    return ort.InferenceSession(str(path), options, providers=resolve_providers(providers),
                                disabled_optimizers=disabled)
