"""The interface every aggregation strategy implements: streaming, one update at a time."""

from __future__ import annotations

import abc
from typing import Dict, Mapping, Optional, Sequence, Tuple

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

    #: True for a strategy whose aggregate is a weighted sum, so that a site can fold its devices' updates
    #: into one `partial` and the root fold partials exactly as it folds updates (FedAvg).
    folds_partials = False

    def accumulate_partial(self, weighted_sum: Mapping[str, np.ndarray], total_weight: int) -> None:
        """Fold in a site's partial: sum_i n_i * u_i (float64) and sum_i n_i; ValueError if this strategy
        cannot (its aggregate does not split into sums)."""
        raise ValueError(f"the {self.name} strategy cannot fold a site's partial: its aggregate is not a sum")

    def partial(self) -> Optional[Tuple[Dict[str, np.ndarray], int]]:
        """(weighted sum, total weight) of what was accumulated, for a site to send upstream; None if nothing
        was; ValueError if this strategy's aggregate is not a sum."""
        raise ValueError(f"the {self.name} strategy cannot make a partial: its aggregate is not a sum")
