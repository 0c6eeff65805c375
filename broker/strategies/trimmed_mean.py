"""Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the `trim` fraction of largest
and of smallest values across the round's updates (on their deltas from the round's global), average
the rest.

floor(trim * n) values go from each end: with 10 updates and trim 0.1, one from each end, so one
attacker is cut out whichever side it pushes. With trim * n < 1 nothing is trimmed (the round row
says how many were: `trimmed_per_side`); `trim_count` fixes the number instead. Unweighted, keeps
every update (bounded: buffered.py), and cannot run under secure aggregation.
"""

from __future__ import annotations

from typing import ClassVar, Dict, Optional

import numpy as np

from .buffered import BUFFER_OPTIONS, DEFAULT_MAX_MEMORY_MB, BufferedDeltas
from .options import Option, fraction_below_half, positive_int


class TrimmedMean(BufferedDeltas):
    name = "trimmed-mean"
    options: ClassVar[Dict[str, Option]] = {
        **BUFFER_OPTIONS,
        "trim": Option(fraction_below_half, 0.1, "fraction of updates dropped at each end, per coordinate"),
        "trim_count": Option(positive_int, None, "updates dropped at each end (instead of trim)"),
    }

    def __init__(self, trim: float = 0.1, trim_count: Optional[int] = None, max_updates: Optional[int] = None,
                 max_memory_mb: float = DEFAULT_MAX_MEMORY_MB, storage: str = "float32") -> None:
        super().__init__(max_updates, max_memory_mb, storage)
        self.trim = fraction_below_half(trim)
        self.trim_count = trim_count
        self._trimmed = 0

    def per_side(self, n: int) -> int:
        """Values dropped at each end of a coordinate with n updates; ValueError if none would be left."""
        k = self.trim_count if self.trim_count is not None else int(self.trim * n)
        if n - 2 * k < 1:
            raise ValueError(f"trim_count={k} drops every one of the round's {n} updates (2 x {k} >= {n})")
        return k

    def finalize(self):
        self._trimmed = self.per_side(self.count) if self.count else 0
        return super().finalize()

    def combine(self, deltas: np.ndarray) -> np.ndarray:
        k = self._trimmed
        n = deltas.shape[0]
        if k == 0:
            return deltas.mean(axis=0)
        return np.sort(deltas, axis=0)[k:n - k].mean(axis=0)

    def describe(self):
        return {**super().describe(), "trim": self.trim, "trim_count": self.trim_count}

    def round_info(self):
        return {"trimmed_per_side": self._trimmed}
