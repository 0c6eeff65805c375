"""What the aggregator asks for round by round: the learning-rate schedule, and when training has plateaued.

Both are pure functions of the round number and the history, so a restarted aggregator asks for
exactly what it would have asked for, and the simulator's baselines follow the same schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from flora.edge.errors import ConfigError

LR_SCHEDULES = ("constant", "cosine")


def round_lr(lr: float, schedule: str, round_: int, total_rounds: int) -> float:
    """The learning rate of round `round_` (0-based) of `total_rounds`.

    constant: `lr` every round. cosine: lr * (1 + cos(pi * round / total)) / 2, from `lr` in round 0
    down to just above zero in the last round (never zero: a round must train).
    """
    if schedule == "constant":
        return float(lr)
    if schedule == "cosine":
        if total_rounds < 1:
            raise ConfigError(f"a cosine schedule needs total rounds >= 1, got {total_rounds}")
        t = min(max(round_, 0), total_rounds - 1) / total_rounds
        return float(lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ConfigError(f"unknown lr schedule {schedule!r}; known: {', '.join(LR_SCHEDULES)}")


@dataclass(frozen=True)
class Plateau:
    """Training has plateaued when the mean of the last `window` values is no more than `min_delta`
    above the mean of the `window` before them (so at least 2 * window rounds are needed)."""

    window: int = 10
    min_delta: float = 0.005

    def __post_init__(self) -> None:
        if self.window < 1 or self.min_delta < 0:
            raise ConfigError(f"plateau window must be >= 1 and min_delta >= 0, got {self.window}, {self.min_delta}")

    def reached(self, values: Sequence[Optional[float]]) -> bool:
        """Whether `values` (one a round, None where unknown) have plateaued; unknown values never count."""
        if len(values) < 2 * self.window:
            return False
        last, before = values[-self.window :], values[-2 * self.window : -self.window]
        if any(v is None for v in (*last, *before)):
            return False
        return sum(last) / self.window - sum(before) / self.window <= self.min_delta  # type: ignore[arg-type]
