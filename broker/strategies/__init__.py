"""Aggregation strategies, one file each, registered by name.

To add one: subclass `Strategy` (base.py) in a new file, keep only running state (memory must not
grow with the number of updates, or say `needs_all_updates` and bound it, as buffered.py does),
declare its options (`options`, see options.py) and add it to `STRATEGIES`; `--strategy NAME`
(with `--strategy-option KEY=VALUE`) then selects it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

from flora.edge.errors import ConfigError

from .base import Strategy, StrategyFull
from .dp_fedavg import DPFedAvg
from .fedavg import FedAvg
from .median import CoordinateMedian
from .norm_bound import NormBound
from .options import OptionError, parse_assignments, resolve
from .product import ProductSVD
from .server_opt import FedAdam, FedAvgM, FedYogi
from .trimmed_mean import TrimmedMean

STRATEGIES: Dict[str, Callable[..., Strategy]] = {
    "fedavg": FedAvg,
    "norm-bound": NormBound,
    "median": CoordinateMedian,
    "trimmed-mean": TrimmedMean,
    "dp-fedavg": DPFedAvg,
    "flexlora": ProductSVD,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
}


def make_strategy(name: str, options: Optional[Mapping[str, Any]] = None) -> Strategy:
    """The strategy `name` with `options` (strings from the command line, or values from a config file)."""
    try:
        factory = STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown aggregation strategy {name!r}; known: {sorted(STRATEGIES)}") from None
    declared = getattr(factory, "options", {})
    kwargs = resolve(name, declared, options)
    try:
        return factory(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:  # an option the strategy itself refuses (a missing max_norm, clip)
        raise ConfigError(str(exc)) from exc


__all__ = ["STRATEGIES", "CoordinateMedian", "DPFedAvg", "FedAdam", "FedAvg", "FedAvgM", "FedYogi", "NormBound",
           "OptionError", "ProductSVD", "Strategy", "StrategyFull", "TrimmedMean", "make_strategy", "parse_assignments"]
