"""The interface every aggregation strategy implements: streaming, one update at a time."""

from __future__ import annotations

import abc
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from flora.edge.bundle import TensorSpec


class Strategy(abc.ABC):
    """begin_round -> accumulate(update) for each accepted update -> finalize() -> the next global.

    Memory must not grow with the number of updates: a strategy keeps running state, never a list.
    `accumulate` gets validated tensors (float32 or float16, possibly read-only views of the message)
    and must not keep references to them.
    """

    name: str

    @abc.abstractmethod
    def begin_round(self, specs: Sequence[TensorSpec], current_global: Mapping[str, np.ndarray]) -> None:
        """Start a round from the current global adapter (float32)."""

    @abc.abstractmethod
    def accumulate(self, tensors: Mapping[str, np.ndarray], num_samples: int) -> None:
        """Fold in one validated update; ValueError (with no state changed) if it cannot be weighted."""

    @abc.abstractmethod
    def finalize(self) -> Optional[Dict[str, np.ndarray]]:
        """The next global adapter (float32), or None if nothing was accumulated; ValueError if it cannot
        be computed. The aggregator checks it is finite before it commits or publishes it."""

    @property
    @abc.abstractmethod
    def count(self) -> int:
        """Updates accumulated this round."""
