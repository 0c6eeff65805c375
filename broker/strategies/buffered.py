"""The base of strategies that need every update of a round (order statistics): a bounded delta buffer.

Each accepted update's delta from the round's global is kept, one row per update, in blocks of rows
allocated as updates come (no copy when it grows). The buffer is bounded: at most `max_updates` rows,
and at most `max_memory_mb` of them; one more update is refused (`StrategyFull`, its reason
`strategy-full`) with what to change. `storage=float16` halves the memory; deltas beyond float16's
range are saturated at +-65504, which keeps the order of values (what a median or trimmed mean reads)
for everything but updates that are both huge and equal. `finalize` works through the coordinates in
chunks of at most `CHUNK_BYTES` of float64, so its scratch memory does not grow with the model.
"""

from __future__ import annotations

import abc
from typing import ClassVar, Dict, List, Mapping, Optional, Sequence

import numpy as np

from flora.edge.adapter import Layout, layout_of
from flora.edge.bundle import TensorSpec

from .base import Strategy, StrategyFull
from .deltas import check_weight, delta_of, flat_global
from .options import Option, choice, positive_float, positive_int

STORAGE = {"float32": np.float32, "float16": np.float16}
FLOAT16_MAX = float(np.finfo(np.float16).max)
#: float64 scratch of one column chunk in `finalize` (n updates x k coordinates)
CHUNK_BYTES = 8 << 20
#: rows are allocated in blocks of about this many bytes (at least one row): the buffer holds at most one
#: block's worth more than its updates, and grows without copying
BLOCK_BYTES = 4 << 20
DEFAULT_MAX_MEMORY_MB = 1024.0

BUFFER_OPTIONS: Dict[str, Option] = {
    "max_updates": Option(positive_int, None, "updates a round may hold (default: as many as max_memory_mb allows)"),
    "max_memory_mb": Option(positive_float, DEFAULT_MAX_MEMORY_MB, "memory for the round's updates, MiB"),
    "storage": Option(choice(*STORAGE), "float32", "float32 or float16 (half the memory)"),
}


class BufferedDeltas(Strategy):
    """Keeps every update's delta (bounded), combines them coordinate by coordinate at `finalize`."""

    needs_all_updates = True
    needs_individual_updates = True
    options: ClassVar[Dict[str, Option]] = BUFFER_OPTIONS

    def __init__(self, max_updates: Optional[int] = None, max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
                 storage: str = "float32") -> None:
        self.requested_max_updates = max_updates
        self.max_memory_mb = float(max_memory_mb)
        self.storage = storage
        self._dtype = STORAGE[storage]
        self._layout: Optional[Layout] = None
        self._global = np.zeros(0)
        self._blocks: List[np.ndarray] = []
        self._block_rows = 1
        self._rows = 0
        self._samples = 0
        self.max_updates = max_updates

    # -- the buffer ------------------------------------------------------------------------------
    def begin_round(self, specs: Sequence[TensorSpec], current_global: Mapping[str, np.ndarray]) -> None:
        self._layout = layout_of(tuple(specs))
        self._global = flat_global(current_global, self._layout)
        row_bytes = max(self._layout.numel * np.dtype(self._dtype).itemsize, 1)
        by_memory = max(int(self.max_memory_mb * (1 << 20) // row_bytes), 1)
        self.max_updates = min(self.requested_max_updates or by_memory, by_memory)
        self._block_rows = max(BLOCK_BYTES // row_bytes, 1)
        self._blocks = []
        self._rows = 0
        self._samples = 0

    def accumulate(self, tensors: Mapping[str, np.ndarray], num_samples: int) -> None:
        weight = check_weight(num_samples)
        if self._layout is None:
            raise RuntimeError("accumulate() before begin_round()")
        assert self.max_updates is not None
        if self._rows >= self.max_updates:
            raise StrategyFull(
                f"the {self.name} strategy holds at most {self.max_updates} updates a round (max_updates="
                f"{self.requested_max_updates}, max_memory_mb={self.max_memory_mb:g}, storage={self.storage}); "
                "raise them with --strategy-option, or ask fewer clients per round")
        delta = delta_of(tensors, self._global, self._layout)
        block, row = divmod(self._rows, self._block_rows)
        if block == len(self._blocks):
            rows = min(self._block_rows, self.max_updates - self._rows)
            self._blocks.append(np.empty((rows, self._layout.numel), self._dtype))
        if self._dtype is np.float16:
            np.clip(delta, -FLOAT16_MAX, FLOAT16_MAX, out=delta)
        self._blocks[block][row] = delta
        self._rows += 1
        self._samples += weight

    def columns(self, start: int, end: int) -> np.ndarray:
        """Coordinates [start, end) of every held delta: an (updates x (end - start)) float64 array."""
        parts = []
        left = self._rows
        for block in self._blocks:
            take = min(left, len(block))
            parts.append(block[:take, start:end])
            left -= take
        return np.concatenate(parts, axis=0).astype(np.float64)

    def finalize(self) -> Optional[Dict[str, np.ndarray]]:
        if self._rows == 0:
            return None
        assert self._layout is not None
        numel = self._layout.numel
        step = max(CHUNK_BYTES // (8 * self._rows), 1024)
        combined = np.empty(numel, np.float64)
        for start in range(0, numel, step):
            end = min(start + step, numel)
            combined[start:end] = self.combine(self.columns(start, end))
        with np.errstate(over="ignore", invalid="ignore"):  # the aggregator checks the result is finite
            return self._layout.split((self._global + combined).astype(np.float32))

    @abc.abstractmethod
    def combine(self, deltas: np.ndarray) -> np.ndarray:
        """(updates x k) float64 deltas -> the k coordinates of the round's combined delta."""

    @property
    def count(self) -> int:
        return self._rows

    @property
    def total_samples(self) -> int:
        return self._samples

    @property
    def memory_bytes(self) -> int:
        """Bytes the buffer holds now."""
        return sum(b.nbytes for b in self._blocks)

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, "max_updates": self.max_updates, "max_memory_mb": self.max_memory_mb,
                "storage": self.storage}
