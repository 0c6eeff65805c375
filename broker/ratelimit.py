"""Per-client rate limits: one token bucket per client id (pure: the clock is injected, no I/O, no locks).

A bucket holds at most `burst` tokens and refills at `per_s` tokens a second; a message costs one token.
A client over its rate has its messages refused (the aggregator counts them, `rate-limited`, without
parsing them), so one device flooding its own topic cannot starve the others: its excess costs a dict
lookup and a counter. The number of buckets is bounded (least recently used forgotten first): a flood of
made-up ids on an open broker cannot grow it, and a forgotten client starts again with a full bucket.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

Clock = Callable[[], float]

MAX_CLIENTS = 100_000
_RATE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*/\s*s\s*(?:,\s*burst\s*=\s*([0-9]*\.?[0-9]+)\s*)?")


@dataclass(frozen=True)
class Rate:
    """`per_s` messages a second sustained, `burst` at once (0 per_s: no limit)."""

    per_s: float
    burst: float

    def __post_init__(self) -> None:
        if self.per_s < 0 or (self.per_s > 0 and self.burst < 1):
            raise ValueError(f"a rate needs per_s >= 0 and a burst >= 1, got {self.per_s}/s, burst {self.burst}")

    @property
    def unlimited(self) -> bool:
        return self.per_s == 0

    @classmethod
    def parse(cls, text: str) -> Rate:
        """'2/s,burst=10' (burst defaults to 5 s of the rate, at least 1); '0' or 'off': no limit."""
        if text.strip().lower() in ("0", "off", "none"):
            return cls(0.0, 0.0)
        m = _RATE.fullmatch(text)
        if not m:
            raise ValueError(f"rate {text!r}: write N/s or N/s,burst=B (e.g. 2/s,burst=10), or off")
        per_s = float(m.group(1))
        return cls(per_s, float(m.group(2)) if m.group(2) else max(1.0, 5 * per_s))

    def describe(self) -> str:
        return "no limit" if self.unlimited else f"{self.per_s:g}/s, burst {self.burst:g}"


class RateLimiter:
    """Token buckets by client id; `allow(client)` spends a token or says no."""

    def __init__(self, rate: Rate, clock: Clock = time.monotonic, max_clients: int = MAX_CLIENTS) -> None:
        self.rate = rate
        self.clock = clock
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, Tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def allow(self, client: str) -> bool:
        if self.rate.unlimited:
            return True
        now = self.clock()
        tokens, at = self._buckets.pop(client, (self.rate.burst, now))
        tokens = min(self.rate.burst, tokens + (now - at) * self.rate.per_s)
        ok = tokens >= 1.0
        self._buckets[client] = (tokens - 1.0 if ok else tokens, now)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return ok

    def tokens(self, client: str) -> Optional[float]:
        """The client's tokens now (None: no bucket yet, i.e. a full one)."""
        if client not in self._buckets:
            return None
        tokens, at = self._buckets[client]
        return min(self.rate.burst, tokens + (self.clock() - at) * self.rate.per_s)
