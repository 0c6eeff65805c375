"""Aggregation strategies, one file each, registered by name.

To add one: subclass `Strategy` (base.py) in a new file, keep only running state (memory must not
grow with the number of updates), and add it to `STRATEGIES`; `--strategy NAME` then selects it.
"""

from __future__ import annotations

from typing import Callable, Dict

from flora.edge.errors import ConfigError

from .base import Strategy
from .fedavg import FedAvg

STRATEGIES: Dict[str, Callable[[], Strategy]] = {"fedavg": FedAvg}


def make_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ConfigError(f"unknown aggregation strategy {name!r}; known: {sorted(STRATEGIES)}") from None


__all__ = ["STRATEGIES", "FedAvg", "Strategy", "make_strategy"]
