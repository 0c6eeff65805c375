"""FFA-LoRA bundles (`flora-export --lora-variant ffa`): the frozen A tensors, and what clipping B bounds.

With A frozen and shared, a LoRA target's weight change is scale * B @ A: linear in B. A device's
change of B by dB changes that target's weights by exactly scale * dB @ A, so when the change of all
its B tensors together is clipped to L2 norm C (edge/dp.py), the change of all its weights together
is at most C * scale * max_t ||A_t||_2 (the largest singular value over the targets), and a dB along
the top singular direction of the worst target reaches it: the weight-space sensitivity of DP-FedAvg
is known exactly. With plain LoRA the change (B + dB)(A + dA) - BA has the cross terms B dA and dB dA,
which grow with the global's own B: no bound in weight space follows from clipping the factors.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping

import numpy as np
from safetensors.numpy import load_file

from .bundle import FROZEN_FACTORS, Bundle, BundleError


def frozen_factors(bundle: Bundle) -> Dict[str, np.ndarray]:
    """{`<target>.lora_A`: A} of an FFA-LoRA bundle (float32); BundleError for any other bundle."""
    if bundle.manifest.lora.variant != "ffa":
        raise BundleError(f"bundle {bundle.root} is a {bundle.manifest.lora.variant!r} bundle: its A tensors are "
                          "trained, not frozen")
    try:
        tensors = load_file(str(bundle.path(FROZEN_FACTORS)))
    except (OSError, ValueError) as exc:  # safetensors raises its own error types, subclasses of these
        raise BundleError(f"cannot read {bundle.path(FROZEN_FACTORS)}: {exc}") from exc
    specs = bundle.manifest.spec_by_name
    for name, a in tensors.items():
        b = specs.get(name[: -len("lora_A")] + "lora_B")
        if not name.endswith(".lora_A") or b is None or a.ndim != 2 or a.shape[0] != b.shape[1]:
            raise BundleError(f"{FROZEN_FACTORS} holds {name} of shape {list(a.shape)}, which pairs with no B tensor")
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def weight_changes(delta_b: Mapping[str, np.ndarray], frozen: Mapping[str, np.ndarray],
                   scale: float) -> Dict[str, np.ndarray]:
    """{target: scale * dB @ A}: how much each target's weights move for a change dB of the B tensors."""
    return {name[: -len(".lora_B")]: scale * np.asarray(d, np.float64) @ np.asarray(
        frozen[name[: -len("lora_B")] + "lora_A"], np.float64) for name, d in delta_b.items()}


def weight_sensitivity(clip: float, scale: float, frozen: Mapping[str, np.ndarray]) -> float:
    """The largest L2 (Frobenius, over all targets) change of the merged weights that a change of the B
    tensors of L2 norm <= `clip` can make: clip * scale * max_t ||A_t||_2. Tight."""
    top = max(float(np.linalg.norm(np.asarray(a, np.float64), 2)) for a in frozen.values())
    return clip * abs(scale) * top


def frobenius(changes: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(c))) for c in changes.values()))
