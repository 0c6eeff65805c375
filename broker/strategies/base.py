"""The interface every aggregation strategy implements: streaming, one update at a time."""

from __future__ import annotations

import abc
from typing import ClassVar, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from flora.edge.bundle import TensorSpec


class Strategy(abc.ABC):
    """begin_round -> accumulate(update) for each accepted update -> finalize() -> the next global.

    Memory must not grow with the number of updates: a strategy keeps running state, never a list.
    `accumulate` gets validated tensors (float32 or float16, possibly read-only views of the message)
    and must not keep references to them.

    A strategy that must see every update before it can compute anything (an order statistic) sets
    `needs_all_updates`, keeps them in a buffer bounded by `max_updates`, and refuses one more with
    `StrategyFull`. A strategy that must see each update on its own (not only their sum) sets
    `needs_individual_updates`: it cannot run on a securely aggregated sum.

    A strategy with state across rounds (a server optimizer's moments) proposes the new state in
    `finalize` and adopts it only in `commit`, which the aggregator calls once the round's global is
    accepted (finite) and before it is checkpointed; `state_dict` is then written beside that global
    and `load_state_dict` gets it back on a restart, so a resumed federation continues exactly.
    """

    name: str
    #: keeps every update of the round (memory grows with them, up to `max_updates`)
    needs_all_updates: ClassVar[bool] = False
    #: looks at each update by itself (a norm, an order statistic): impossible under secure aggregation
    #: (read it on the instance: it may depend on the options)
    needs_individual_updates: bool = False
    #: updates a round can hold (None: no limit, the strategy keeps running sums only)
    max_updates: Optional[int] = None

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

    def set_round_size(self, asked: int) -> None:
        """How many clients the round asked (after begin_round, again if an extension asks more). Most
        strategies ignore it; DP-FedAvg divides by it, a number fixed before any update is seen."""
        return None

    def describe(self) -> Dict[str, object]:
        """The strategy and its options, for the log and the history rows."""
        return {"name": self.name}

    def round_info(self) -> Dict[str, object]:
        """Facts about the round just finalized (updates clipped, trimmed, noise added), for its history row."""
        return {}

    def commit(self) -> None:  # noqa: B027 - optional hook, a no-op for stateless strategies
        """Adopt the state `finalize` proposed (the round's global was accepted). Stateless: nothing."""

    def state_dict(self) -> Dict[str, np.ndarray]:
        """State carried across rounds (committed), to checkpoint; {} for a stateless strategy."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what `state_dict` returned (on a restart, before the next round begins)."""
        if state:
            raise ValueError(f"the {self.name} strategy keeps no state, but the checkpoint holds {sorted(state)[:3]}")


class StrategyFull(ValueError):
    """A strategy that keeps every update holds as many as it may (`max_updates`): this one is refused."""
