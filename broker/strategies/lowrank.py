"""LoRA pairs and the exact mean of their products.

A LoRA target's weight change is scale * B @ A. Averaging A and B separately (FedAvg) gives
mean(B) @ mean(A), which is not mean(B @ A): the cross terms B_j A_k of different clients enter.
`ProductSums` keeps the exact weighted sum of the products per target, in float64.

Memory: one d_out x d_in float64 matrix per target, whatever the number of updates (for ViT-B/32's
text tower with q, k, v, out: 48 targets of 512 x 512, 96 MiB; for clip-tiny: 8 of 64 x 64, 256 KiB).
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from flora.edge.bundle import TensorSpec

A_SUFFIX, B_SUFFIX = ".lora_A", ".lora_B"


def lora_pairs(specs: Sequence[TensorSpec]) -> List[Tuple[str, str, str]]:
    """(target, A name, B name) for every LoRA pair (A: rank x in, B: out x rank); ValueError if one is incomplete."""
    by_name = {s.name: s for s in specs}
    pairs = []
    for spec in specs:
        if not spec.name.endswith(A_SUFFIX):
            continue
        target = spec.name[: -len(A_SUFFIX)]
        b = by_name.get(target + B_SUFFIX)
        if b is None or len(spec.shape) != 2 or len(b.shape) != 2 or b.shape[1] != spec.shape[0]:
            raise ValueError(f"LoRA tensor {spec.name} has no matching {target + B_SUFFIX} of shape (out, rank)")
        pairs.append((target, spec.name, b.name))
    paired = {n for _, a, b in pairs for n in (a, b)}
    if paired != set(by_name):
        raise ValueError(f"tensors outside LoRA pairs: {sorted(set(by_name) - paired)[:3]}")
    return pairs


class ProductSums:
    """Running sum_k w_k B_k @ A_k per target (float64)."""

    def __init__(self, specs: Sequence[TensorSpec]) -> None:
        self.pairs = lora_pairs(specs)
        shapes = {s.name: s.shape for s in specs}
        self.sums: Dict[str, np.ndarray] = {t: np.zeros((shapes[b][0], shapes[a][1])) for t, a, b in self.pairs}

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.sums.values())

    def add(self, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        for target, a, b in self.pairs:
            prod = np.asarray(tensors[b], dtype=np.float64) @ np.asarray(tensors[a], dtype=np.float64)
            self.sums[target] += weight * prod

    def means(self, total: float) -> Dict[str, np.ndarray]:
        return {t: s / total for t, s in self.sums.items()}


def relative_error(approx: Mapping[str, np.ndarray], exact: Mapping[str, np.ndarray]) -> float:
    """||approx - exact||_F / ||exact||_F over all targets together (0 when both are zero)."""
    num = sum(float(np.sum((approx[t] - exact[t]) ** 2)) for t in exact)
    den = sum(float(np.sum(exact[t] ** 2)) for t in exact)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


def separate_products(tensors: Mapping[str, np.ndarray], pairs: Sequence[Tuple[str, str, str]]
                      ) -> Dict[str, np.ndarray]:
    """B @ A per target of one adapter (e.g. FedAvg's separately averaged A and B), in float64."""
    return {t: np.asarray(tensors[b], np.float64) @ np.asarray(tensors[a], np.float64) for t, a, b in pairs}
