"""Buffered asynchronous aggregation (FedBuff, Nguyen et al., AISTATS 2022) without MQTT or disk.

The aggregator publishes global *versions* (the protocol's `round`). A device trains from the newest
global it holds, its *base version* b, and tags its update with b. At version v the update's
staleness is s = v - b: an update with s > S (`--max-staleness`) is rejected `stale`, one from the
future (b > v) `early`, and a second update for the same (client, base version) `duplicate`.

Each accepted update is *rebased* onto the current global before it reaches the aggregation strategy:

    u' = g_v + w(s) * (u - g_b)          w: the staleness function, g_b: the global of version b

so a fresh update (s = 0) reaches the strategy unchanged, and a stale one as its own delta, scaled
down, applied to today's global. The strategy (FedAvg: weighted by num_samples) averages the K
rebased updates of a buffer, and the next version is

    g_{v+1} = g_v + eta * (average - g_v)      eta: the server learning rate (`--server-lr`)

With FedAvg that is g_v + eta * sum_i n_i w(s_i) (u_i - g_{b_i}) / sum_i n_i: the staleness weight
shrinks a stale update's step, it is not renormalised away. With K equal to the number of clients,
no staleness and eta = 1 it is exactly synchronous FedAvg.

Memory is bounded: the last S + 1 globals are kept (they are the only bases an update may have), so
an async aggregator holds (S + 1) adapters, plus the record of which (client, base version) pairs
were accepted for those S + 1 bases.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

import numpy as np

from .rounds import MAX_REJECTION_DETAILS
from .validation import Rejected

Clock = Callable[[], float]

WAIT = "wait"
CLOSE = "close"

STALENESS_KINDS = ("sqrt", "constant", "hinge")


@dataclass(frozen=True)
class Staleness:
    """w(s): `sqrt` 1/(1+sqrt(s)) (FedBuff, NVIDIA FLARE), `constant` 1, `hinge:A,B` 1 up to B versions
    old, then 1/(1 + A(s - B)) (FedAsync)."""

    kind: str = "sqrt"
    a: float = 0.0
    b: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in STALENESS_KINDS:
            raise ValueError(f"staleness function {self.kind!r} is not one of {STALENESS_KINDS}")
        if not (math.isfinite(self.a) and math.isfinite(self.b) and self.a >= 0 and self.b >= 0):
            raise ValueError(f"hinge:A,B needs finite A, B >= 0, got {self.a}, {self.b}")

    @classmethod
    def parse(cls, text: str) -> Staleness:
        """`sqrt`, `constant` or `hinge:A,B`."""
        name, _, args = str(text).strip().partition(":")
        if name != "hinge":
            if args:
                raise ValueError(f"staleness {name!r} takes no arguments, got {text!r}")
            return cls(name)
        try:
            a, b = (float(x) for x in args.split(","))
        except ValueError:
            raise ValueError(f"--staleness hinge needs two numbers, hinge:A,B, got {text!r}") from None
        return cls("hinge", a, b)

    def __call__(self, staleness: int) -> float:
        if staleness < 0:
            raise ValueError(f"staleness {staleness} is negative")
        if self.kind == "constant":
            return 1.0
        if self.kind == "sqrt":
            return 1.0 / (1.0 + math.sqrt(staleness))
        return 1.0 if staleness <= self.b else 1.0 / (1.0 + self.a * (staleness - self.b))

    @property
    def describe(self) -> str:
        return f"hinge:{self.a:g},{self.b:g}" if self.kind == "hinge" else self.kind


@dataclass(frozen=True)
class BufferConfig:
    """K updates per version, the oldest base version accepted (S versions back), w(s), eta."""

    buffer: int = 10
    max_staleness: int = 10
    staleness: Staleness = field(default_factory=Staleness)
    server_lr: float = 1.0
    min_updates: int = 1  # a buffer with at least this many closes at the deadline even if it holds fewer than K

    def __post_init__(self) -> None:
        if self.buffer < 1:
            raise ValueError(f"--buffer must be >= 1, got {self.buffer}")
        if self.max_staleness < 0:
            raise ValueError(f"--max-staleness must be >= 0, got {self.max_staleness}")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"--server-lr must be > 0, got {self.server_lr}")
        if not self.min_updates >= 1:
            raise ValueError(f"the buffer's quorum must be >= 1, got {self.min_updates}")


class GlobalWindow:
    """The globals of the last `keep` versions, flat float32, oldest dropped first (bounded memory)."""

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError("the window keeps at least the current global")
        self.keep = keep
        self._flat: OrderedDict[int, np.ndarray] = OrderedDict()

    def add(self, version: int, flat: np.ndarray) -> None:
        if self._flat and version <= next(reversed(self._flat)):
            raise ValueError(f"version {version} is not newer than {next(reversed(self._flat))}")
        arr = np.array(flat, dtype=np.float32)  # a private copy
        arr.setflags(write=False)
        self._flat[version] = arr
        while len(self._flat) > self.keep:
            self._flat.popitem(last=False)

    def get(self, version: int) -> np.ndarray:
        try:
            return self._flat[version]
        except KeyError:
            raise KeyError(f"the global of version {version} is not held (versions {self.versions})") from None

    def __contains__(self, version: object) -> bool:
        return version in self._flat

    @property
    def versions(self) -> List[int]:
        return list(self._flat)

    @property
    def latest(self) -> int:
        return next(reversed(self._flat))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._flat.values())


@dataclass
class BufferRecord:
    """The buffer of the version being built; a history row when it closes (JSON across restarts).

    `accepted` lists every update folded so far, in arrival order: [client, base, num_samples,
    staleness weight]; at most K entries.
    """

    version: int
    started_at: float
    deadline: float
    accepted: List[List[Any]] = field(default_factory=list)
    rejected: List[Dict[str, str]] = field(default_factory=list)  # the first 100, with detail
    rejection_counts: Dict[str, int] = field(default_factory=dict)
    bytes_received: int = 0
    bytes_rejected: int = 0
    first_update_at: Optional[float] = None
    metrics: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # by pair_key(client, base)
    _reported: Dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def number(self) -> int:
        """The version this buffer builds on (the protocol's round)."""
        return self.version

    @property
    def count(self) -> int:
        return len(self.accepted)

    @property
    def reported(self) -> Dict[str, int]:
        """num_samples by pair_key(client, base) of the accepted updates (kept as they are accepted: a buffer
        of thousands is looked up for every metrics message)."""
        if len(self._reported) != len(self.accepted):
            self._reported = {pair_key(c, b): n for c, b, n, _ in self.accepted}
        return self._reported

    @property
    def samples(self) -> int:
        return int(sum(entry[2] for entry in self.accepted))

    def add(self, client: str, base: int, num_samples: int, weight: float) -> None:
        reported = self.reported  # in step with `accepted` before this one
        reported[pair_key(client, base)] = int(num_samples)
        self.accepted.append([client, int(base), int(num_samples), float(weight)])

    @property
    def num_rejected(self) -> int:
        return sum(self.rejection_counts.values())

    def reject(self, client: str, reason: str, detail: str, size: int) -> None:
        if len(self.rejected) < MAX_REJECTION_DETAILS:
            self.rejected.append({"client": client, "reason": reason, "detail": detail})
        self.rejection_counts[reason] = self.rejection_counts.get(reason, 0) + 1
        self.bytes_rejected += size

    def to_json(self) -> Dict[str, Any]:
        return {"version": self.version, "started_at": self.started_at, "deadline": self.deadline,
                "accepted": [list(a) for a in self.accepted], "rejected": list(self.rejected),
                "rejection_counts": dict(self.rejection_counts), "bytes_received": self.bytes_received,
                "bytes_rejected": self.bytes_rejected, "first_update_at": self.first_update_at,
                "metrics": dict(self.metrics),
                # what readers of a round's snapshot look for (the dashboard, `flora-aggregator status`)
                "mode": "async", "number": self.version, "reported": self.reported, "asked": [], "extensions": 0}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BufferRecord:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})  # type: ignore[arg-type]


def pair_key(client: str, base: int) -> str:
    """`client@base`: one accepted update's name in the journal and the history (ids never hold '@')."""
    return f"{client}@{base}"


def split_pair(key: str) -> Tuple[str, int]:
    client, _, base = key.rpartition("@")
    return client, int(base)


class FedBuff:
    """Admission, staleness weights, rebasing and version advance of buffered asynchronous aggregation.

    Feed it: `admit` (before the tensors are looked at), `rebase` (an admitted update's flat tensors),
    `accept` (once the update is durable), `step` (close the buffer?), `advance` (the new global).
    The I/O side persists `seen_json()` with every new version and each buffer's updates, so a restart
    rebuilds exactly this state.
    """

    def __init__(self, cfg: BufferConfig, timeout_s: float, clock: Clock = time.time) -> None:
        if not timeout_s > 0:
            raise ValueError(f"--round-timeout must be > 0, got {timeout_s}")
        self.cfg = cfg
        self.timeout_s = timeout_s
        self.clock = clock
        self.window = GlobalWindow(cfg.max_staleness + 1)
        self.seen: Dict[int, Set[str]] = {}  # base version -> clients with an accepted update from it
        self._scratch = np.zeros(0, np.float64)

    # -- versions ----------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.window.latest

    @property
    def oldest_base(self) -> int:
        """The oldest base version an update may have now."""
        return max(self.version - self.cfg.max_staleness, 0)

    def start(self, version: int, flat: np.ndarray, older: Iterable[Tuple[int, np.ndarray]] = ()) -> None:
        """Load the current global (and, after a restart, the older ones of the window, oldest first)."""
        for v, arr in older:
            if v >= version - self.cfg.max_staleness:
                self.window.add(v, arr)
        self.window.add(version, flat)

    def open(self, seen: Optional[Mapping[int, Iterable[str]]] = None) -> BufferRecord:
        """The buffer of the current version (due one timeout from now), with the accepted pairs restored."""
        if seen is not None:
            self.seen = {int(b): set(cs) for b, cs in seen.items() if int(b) >= self.oldest_base}
        now = self.clock()
        return BufferRecord(self.version, now, now + self.timeout_s)

    def resume(self, rec: BufferRecord) -> BufferRecord:
        """A buffer restored after a restart: its accepted updates are re-folded by the caller; a fresh deadline."""
        rec.deadline = self.clock() + self.timeout_s
        return rec

    # -- one update ----------------------------------------------------------------------------------
    def staleness_of(self, base: int) -> int:
        return self.version - base

    def admit(self, client: str, base: int) -> float:
        """The staleness weight of an update from `base`, or `Rejected` (stale, early, duplicate)."""
        if base > self.version:
            raise Rejected("early", f"base version {base}, the current version is {self.version}")
        staleness = self.version - base
        if staleness > self.cfg.max_staleness or base not in self.window:
            raise Rejected("stale", f"base version {base} is {staleness} versions old (--max-staleness "
                                    f"{self.cfg.max_staleness})")
        if client in self.seen.get(base, ()):
            raise Rejected("duplicate", f"{client} already has an accepted update from base version {base}")
        return self.cfg.staleness(staleness)

    def rebase(self, flat: np.ndarray, base: int, weight: float) -> np.ndarray:
        """g_v + weight * (u - g_base) in float64, in a scratch buffer reused by the next call (the strategy
        must not keep it). A fresh update comes back equal to itself."""
        current = self.window.get(self.version)
        if flat.shape != current.shape:
            raise ValueError(f"update of {flat.size} values, the adapter has {current.size}")
        if self._scratch.shape != current.shape:
            self._scratch = np.zeros(current.shape, np.float64)
        out = self._scratch
        np.subtract(flat, self.window.get(base), out=out, dtype=np.float64)
        if weight != 1.0:
            out *= weight
        out += current
        return out

    def accept(self, rec: BufferRecord, client: str, base: int, num_samples: int, weight: float, size: int) -> None:
        """Record an update folded into the buffer (call it once the update is durable)."""
        self.seen.setdefault(base, set()).add(client)
        rec.add(client, base, num_samples, weight)
        rec.bytes_received += size
        if rec.first_update_at is None:
            rec.first_update_at = self.clock()

    # -- the buffer ----------------------------------------------------------------------------------
    def step(self, rec: BufferRecord) -> str:
        """CLOSE once the buffer holds K updates, or at the deadline if it holds the quorum; else WAIT."""
        if rec.count >= self.cfg.buffer:
            return CLOSE
        if self.clock() >= rec.deadline and rec.count >= self.cfg.min_updates:
            return CLOSE
        return WAIT

    def overdue(self, rec: BufferRecord) -> bool:
        """Past the deadline below the quorum: the caller logs it and moves the deadline (no version is lost)."""
        if self.clock() >= rec.deadline and rec.count < self.cfg.min_updates:
            rec.deadline = self.clock() + self.timeout_s
            return True
        return False

    def next_global(self, average: np.ndarray) -> np.ndarray:
        """g_v + eta * (average - g_v), float32 (the average itself when eta is 1)."""
        avg = np.asarray(average, dtype=np.float32)
        if self.cfg.server_lr == 1.0:
            return avg
        current = self.window.get(self.version).astype(np.float64)
        return (current + self.cfg.server_lr * (avg.astype(np.float64) - current)).astype(np.float32)

    def advance(self, flat: np.ndarray) -> int:
        """Make `flat` the next version; forget the bases that are now too old. Returns the new version."""
        self.window.add(self.version + 1, flat)
        oldest = self.oldest_base
        self.seen = {b: cs for b, cs in self.seen.items() if b >= oldest}
        return self.version

    def seen_json(self) -> Dict[str, List[str]]:
        """The accepted (client, base) pairs still in the window, for the state file."""
        return {str(b): sorted(cs) for b, cs in sorted(self.seen.items())}
