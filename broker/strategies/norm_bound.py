"""Server-side norm bounding (Sun et al. 2019, "Can you really backdoor federated learning?"): each
update's delta from the round's global is scaled down to L2 norm at most `max_norm`, then the deltas
are averaged as FedAvg does (weighted by num_samples, or uniformly).

Streaming, with running float64 sums only. A boosted update (`scale:100`) is brought back to the
size of an honest one, so it can no longer replace the model; its direction still counts with its
weight, so a bound near the honest updates' norms is what limits it. It looks at each update's norm,
so it cannot run under secure aggregation.
"""

from __future__ import annotations

from typing import ClassVar, Dict, Mapping, Optional, Sequence

import numpy as np

from flora.edge.adapter import Layout, layout_of
from flora.edge.bundle import TensorSpec
from flora.edge.dp import clip_factor

from .base import Strategy
from .deltas import check_weight, delta_of, flat_global, l2
from .options import Option, choice, positive_float


class NormBound(Strategy):
    name = "norm-bound"
    needs_individual_updates = True
    options: ClassVar[Dict[str, Option]] = {
        "max_norm": Option(positive_float, None, "L2 bound on each update's delta (required)"),
        "weighting": Option(choice("samples", "uniform"), "samples", "weight deltas by num_samples or equally"),
    }

    def __init__(self, max_norm: Optional[float] = None, weighting: str = "samples") -> None:
        if max_norm is None:
            raise ValueError("the norm-bound strategy needs max_norm (--strategy-option max_norm=M), the L2 bound "
                             "on each update's delta from the round's global")
        self.max_norm = positive_float(max_norm)
        self.weighting = weighting
        self._layout: Optional[Layout] = None
        self._global = np.zeros(0)
        self._sum = np.zeros(0)
        self._weight = 0.0
        self._count = 0
        self._samples = 0
        self._clipped = 0

    def begin_round(self, specs: Sequence[TensorSpec], current_global: Mapping[str, np.ndarray]) -> None:
        self._layout = layout_of(tuple(specs))
        self._global = flat_global(current_global, self._layout)
        self._sum = np.zeros(self._layout.numel, np.float64)
        self._weight, self._count, self._samples, self._clipped = 0.0, 0, 0, 0

    def accumulate(self, tensors: Mapping[str, np.ndarray], num_samples: int) -> None:
        samples = check_weight(num_samples)
        if self._layout is None:
            raise RuntimeError("accumulate() before begin_round()")
        weight = float(samples) if self.weighting == "samples" else 1.0
        delta = delta_of(tensors, self._global, self._layout)
        norm = l2(delta)
        if not np.isfinite(norm):  # finite values whose squares overflow: scale first, then measure
            peak = float(np.max(np.abs(delta)))
            norm = peak * l2(delta / peak)
        scale = clip_factor(norm, self.max_norm)
        self._sum += (weight * scale) * delta
        self._weight += weight
        self._count += 1
        self._samples += samples
        self._clipped += int(scale < 1.0)

    def finalize(self) -> Optional[Dict[str, np.ndarray]]:
        if self._count == 0:
            return None
        assert self._layout is not None
        with np.errstate(over="ignore", invalid="ignore"):
            return self._layout.split((self._global + self._sum / self._weight).astype(np.float32))

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_samples(self) -> int:
        return self._samples

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, "max_norm": self.max_norm, "weighting": self.weighting}

    def round_info(self) -> Dict[str, object]:
        return {"clipped": self._clipped}
