"""FedAvg as in FLORA: each LoRA tensor (A and B separately) averaged, weighted by sample counts.

global = sum_k n_k * update_k / sum_k n_k, with n_k the client's `num_samples`. The current global
plays no part: FLORA's server replaces it by the weighted mean of the clients' adapters.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from edge.bundle import TensorSpec

from .base import Strategy


class FedAvg(Strategy):
    """Running weighted sums in float64 (one buffer per tensor), divided once at the end."""

    name = "fedavg"

    def __init__(self) -> None:
        self._sums: Dict[str, np.ndarray] = {}
        self._scratch: Dict[str, np.ndarray] = {}
        self._weight = 0
        self._count = 0

    def begin_round(self, specs: Sequence[TensorSpec], current_global: Mapping[str, np.ndarray]) -> None:
        self._sums = {s.name: np.zeros(s.shape, np.float64) for s in specs}
        self._scratch = {s.name: np.empty(s.shape, np.float64) for s in specs}
        self._weight = 0
        self._count = 0

    def accumulate(self, tensors: Mapping[str, np.ndarray], num_samples: int) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not self._sums:
            raise RuntimeError("accumulate() before begin_round()")
        for name, total in self._sums.items():
            scratch = self._scratch[name]
            np.multiply(tensors[name], float(num_samples), out=scratch, dtype=np.float64)
            total += scratch
        self._weight += num_samples
        self._count += 1

    def finalize(self) -> Optional[Dict[str, np.ndarray]]:
        if self._count == 0:
            return None
        return {name: (total / self._weight).astype(np.float32) for name, total in self._sums.items()}

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_samples(self) -> int:
        return self._weight
