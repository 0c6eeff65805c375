"""Round bookkeeping without MQTT: who is asked, who reported, what was rejected, when to close or extend.

Time comes from an injectable clock, so the quorum and timeout rules are tested without sleeping.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Set

Clock = Callable[[], float]


@dataclass(frozen=True)
class Sampling:
    """Which online clients a round asks: all, a fixed number, or a fraction (at least min_clients)."""

    clients_per_round: Optional[int] = None
    fraction: Optional[float] = None
    min_clients: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("give clients_per_round or fraction, not both")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            raise ValueError("clients_per_round must be >= 1")
        if self.min_clients < 1:
            raise ValueError("min_clients must be >= 1")

    def choose(self, online: Iterable[str], round_number: int) -> List[str]:
        pool = sorted(online)
        if self.clients_per_round is None and self.fraction is None:
            return pool
        want = self.clients_per_round if self.clients_per_round is not None else round(self.fraction * len(pool))
        want = min(len(pool), max(int(want), self.min_clients))
        rng = random.Random(f"{self.seed}:{round_number}")
        return sorted(rng.sample(pool, want))


@dataclass
class RoundRecord:
    """One round's state; becomes a history row when it closes."""

    number: int
    asked: Set[str]
    started_at: float
    deadline: float
    reported: Dict[str, int] = field(default_factory=dict)  # client -> num_samples
    rejected: List[Dict[str, str]] = field(default_factory=list)  # {client, reason, detail}
    bytes_received: int = 0
    bytes_rejected: int = 0
    extensions: int = 0
    metrics: Dict[str, dict] = field(default_factory=dict)

    def reject(self, client: str, reason: str, detail: str, size: int) -> None:
        self.rejected.append({"client": client, "reason": reason, "detail": detail})
        self.bytes_rejected += size

    def accept(self, client: str, num_samples: int, size: int) -> None:
        self.reported[client] = num_samples
        self.bytes_received += size

    @property
    def rejection_counts(self) -> Dict[str, int]:
        return dict(Counter(r["reason"] for r in self.rejected))


class RoundClock:
    """Decides when a round closes: all asked clients reported, or the deadline with a quorum."""

    def __init__(self, min_clients: int, timeout_s: float, clock: Clock = time.time) -> None:
        if timeout_s <= 0:
            raise ValueError("round timeout must be > 0")
        self.min_clients = min_clients
        self.timeout_s = timeout_s
        self.clock = clock

    def open(self, number: int, asked: Iterable[str]) -> RoundRecord:
        now = self.clock()
        return RoundRecord(number, set(asked), now, now + self.timeout_s)

    def complete(self, rec: RoundRecord) -> bool:
        return bool(rec.asked) and rec.asked <= set(rec.reported)

    def due(self, rec: RoundRecord) -> bool:
        return self.clock() >= rec.deadline

    def quorum(self, rec: RoundRecord) -> bool:
        return len(rec.reported) >= self.min_clients

    def should_close(self, rec: RoundRecord) -> bool:
        return self.complete(rec) or (self.due(rec) and self.quorum(rec))

    def extend(self, rec: RoundRecord, online: Iterable[str], sampling: Sampling) -> List[str]:
        """Below quorum at the deadline: one more timeout; ask more online clients if those asked
        and still online cannot reach the quorum. Returns the newly asked clients."""
        rec.deadline = self.clock() + self.timeout_s
        rec.extensions += 1
        online = set(online)
        reachable = set(rec.reported) | (rec.asked & online)
        added: List[str] = []
        missing = self.min_clients - len(reachable)
        if missing > 0:
            spare = sorted(online - rec.asked)
            rng = random.Random(f"{sampling.seed}:{rec.number}:extend{rec.extensions}")
            added = sorted(rng.sample(spare, min(missing, len(spare))))
            rec.asked |= set(added)
        return added
