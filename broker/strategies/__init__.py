"""Aggregation strategies, one file each, registered by name."""

from __future__ import annotations

from typing import Callable, Dict

from .base import Strategy
from .fedavg import FedAvg

STRATEGIES: Dict[str, Callable[[], Strategy]] = {"fedavg": FedAvg}


def make_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown aggregation strategy {name!r}; known: {sorted(STRATEGIES)}") from None


__all__ = ["STRATEGIES", "FedAvg", "Strategy", "make_strategy"]
