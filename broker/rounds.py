"""The round state machine without MQTT: who is asked, who reported, what was rejected, when to close or extend.

Time comes from an injectable clock, so the quorum, timeout and extension rules are tested without
sleeping. The aggregator feeds events into a `RoundRecord` and asks `RoundClock.step` what to do.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set

from flora.edge.errors import EXIT_QUORUM, ConfigError, FloraError
from flora.edge.protocol import PERMANENT_ERRORS as PROTOCOL_PERMANENT_ERRORS

from .validation import BAD_CLIENT_ID, NO_ROUND, RATE_LIMITED

Clock = Callable[[], float]

#: Rejections kept with their detail in a round's record; all of them are counted by reason.
MAX_REJECTION_DETAILS = 100

WAIT = "wait"
CLOSE = "close"
EXTEND = "extend"
GIVE_UP = "give-up"

#: Rejections that say nothing about the client's submission for *this* round (it may still send one).
OTHER_ROUND_REASONS = ("late", "early", NO_ROUND, BAD_CLIENT_ID, RATE_LIMITED)
#: Status error codes of a device that cannot take part until someone fixes it (a bundle of another model, a
#: newer protocol): it is not asked while its latest status says so.
PERMANENT_ERRORS = PROTOCOL_PERMANENT_ERRORS


@dataclass(frozen=True)
class ClientError:
    """A device's latest status is `error`: for which round, why (a code, when it sent one), and its message."""

    round: Optional[int] = None
    code: Optional[str] = None
    message: Optional[str] = None

    @property
    def permanent(self) -> bool:
        return self.code in PERMANENT_ERRORS

    def settles(self, number: int) -> bool:
        """It will send no update for round `number`: the error is permanent, or it failed in that round."""
        return self.permanent or self.round == number


@dataclass(frozen=True)
class Sampling:
    """Which online clients a round asks: all, a fixed number, or a fraction (at least min_clients)."""

    clients_per_round: Optional[int] = None
    fraction: Optional[float] = None
    min_clients: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ConfigError("give --clients-per-round or --fraction, not both")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            raise ConfigError(f"--clients-per-round must be >= 1, got {self.clients_per_round}")
        if self.min_clients < 1:
            raise ConfigError(f"--min-clients must be >= 1, got {self.min_clients}")

    @property
    def describe(self) -> str:
        if self.clients_per_round is not None:
            return f"{self.clients_per_round} per round"
        if self.fraction is not None:
            return f"fraction {self.fraction}"
        return "all online"

    def choose(self, online: Iterable[str], round_number: int) -> List[str]:
        """The clients to ask: seeded by (seed, round), independent of the order `online` comes in."""
        pool = sorted(set(online))
        if self.clients_per_round is None and self.fraction is None:
            return pool
        want = self.clients_per_round if self.clients_per_round is not None else round(self.fraction * len(pool))
        want = min(len(pool), max(int(want), self.min_clients))
        rng = random.Random(f"{self.seed}:{round_number}")
        return sorted(rng.sample(pool, want))

    def more(self, candidates: Iterable[str], count: int, round_number: int, attempt: int) -> List[str]:
        """`count` more clients out of `candidates` when a round is extended (seeded as well)."""
        pool = sorted(set(candidates))
        rng = random.Random(f"{self.seed}:{round_number}:extend{attempt}")
        return sorted(rng.sample(pool, min(max(count, 0), len(pool))))


@dataclass
class RoundRecord:
    """One round's state; becomes a history row when it closes (and survives a restart as JSON)."""

    number: int
    asked: Set[str]
    started_at: float
    deadline: float
    reported: Dict[str, int] = field(default_factory=dict)  # client -> num_samples
    rejected: List[Dict[str, str]] = field(default_factory=list)  # {client, reason, detail}, the first 100
    rejection_counts: Dict[str, int] = field(default_factory=dict)  # reason -> count, all of them
    bytes_received: int = 0
    bytes_rejected: int = 0
    extensions: int = 0
    metrics: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    complete_since: Optional[float] = None  # when the last asked client reported
    refused: Set[str] = field(default_factory=set)  # clients whose update for this round was rejected
    errored: Set[str] = field(default_factory=set)  # asked clients in error for this round: they send nothing
    # asked clients whose status says they submitted this round while no update of theirs came: since when
    missing_since: Dict[str, float] = field(default_factory=dict)
    resend: Dict[str, int] = field(default_factory=dict)  # client -> times asked to send its update again
    population: int = 0  # the clients the round was sampled from (online, not blocked): DP charges asked/population

    def reject(self, client: str, reason: str, detail: str, size: int) -> None:
        """Count a rejection; a client whose update for this round was refused will not send another."""
        if len(self.rejected) < MAX_REJECTION_DETAILS:
            self.rejected.append({"client": client, "reason": reason, "detail": detail})
        self.rejection_counts[reason] = self.rejection_counts.get(reason, 0) + 1
        self.bytes_rejected += size
        if reason not in OTHER_ROUND_REASONS:
            self.refused.add(client)

    @property
    def num_rejected(self) -> int:
        return sum(self.rejection_counts.values())

    def accept(self, client: str, num_samples: int, size: int) -> None:
        if client in self.reported:
            raise ValueError(f"{client} already reported in round {self.number}")
        self.reported[client] = int(num_samples)
        self.bytes_received += size
        self.missing_since.pop(client, None)

    def submitted(self, client: str, round_: Optional[int], now: float) -> bool:
        """A status of `client` says it submitted `round_`: True when that is this round, it was asked, and no
        update of it has come (accepted or refused): the update was lost on the way (a broker that dropped
        it, a rate limit) unless it is still in flight, so it is noted as missing since `now`."""
        if round_ != self.number or client not in self.asked or client in self.reported or client in self.refused:
            return False
        self.missing_since.setdefault(client, now)
        return True

    def due_resends(self, now: float, after_s: float, max_attempts: int) -> List[str]:
        """The missing clients to ask again now (missing for `after_s`, asked fewer than `max_attempts`
        times); each one's attempt count goes up and its wait starts again."""
        due = sorted(c for c, since in self.missing_since.items()
                     if now - since >= after_s and self.resend.get(c, 0) < max_attempts
                     and c not in self.reported and c not in self.refused)
        for client in due:
            self.resend[client] = self.resend.get(client, 0) + 1
            self.missing_since[client] = now
        return due

    def to_json(self) -> Dict[str, Any]:
        """A shallow dict (no deep copy: a round of 10,000 clients is snapshotted every few seconds)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["asked"] = sorted(self.asked)
        d["refused"] = sorted(self.refused)
        d["errored"] = sorted(self.errored)
        return d

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> RoundRecord:
        d = dict(d)
        d["asked"] = set(d["asked"])
        d["refused"] = set(d.get("refused", ()))
        d["errored"] = set(d.get("errored", ()))
        return cls(**d)


@dataclass
class NoRoundUpdates:
    """Updates that arrived while no round was open, counted in round `round`'s record: `no-round` (or another
    reason the aggregator gave, e.g. `bad-client-id`)."""

    round: int
    count: int = 0
    bytes: int = 0
    details: List[Dict[str, str]] = field(default_factory=list)  # the first 100
    counts: Dict[str, int] = field(default_factory=dict)  # reason -> count, for reasons other than no-round

    def add(self, client: str, detail: str, size: int, reason: str = NO_ROUND) -> None:
        if len(self.details) < MAX_REJECTION_DETAILS:
            self.details.append({"client": client, "reason": reason, "detail": detail})
        if reason == NO_ROUND:
            self.count += 1
        else:
            self.counts[reason] = self.counts.get(reason, 0) + 1
        self.bytes += size

    def merge_into(self, rec: RoundRecord) -> None:
        room = max(MAX_REJECTION_DETAILS - len(rec.rejected), 0)
        rec.rejected.extend(self.details[:room])
        for reason, count in ((NO_ROUND, self.count), *self.counts.items()):
            if count:
                rec.rejection_counts[reason] = rec.rejection_counts.get(reason, 0) + count
        rec.bytes_rejected += self.bytes

    @property
    def total(self) -> int:
        return self.count + sum(self.counts.values())

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> NoRoundUpdates:
        return cls(**d)


@dataclass(frozen=True)
class Step:
    """What the aggregator should do now: WAIT, CLOSE, EXTEND (then re-announce; `added` were asked too), or
    GIVE_UP (below quorum after `max_extensions` extensions). `errored`: asked clients found in error for this
    round by this step (each is reported once per round, to be logged with its message)."""

    action: str
    added: List[str] = field(default_factory=list)
    errored: List[str] = field(default_factory=list)


class RoundClock:
    """Closes a round when every asked client reported (after a short grace for their metrics), or at the
    deadline with a quorum; below quorum at the deadline it extends the round by one timeout, at most
    `max_extensions` times (0: no limit), then gives up.

    `available` (passed to `step`) is the set of clients that can train now: online, and not in `error`.
    """

    def __init__(self, sampling: Sampling, timeout_s: float, clock: Clock = time.time,
                 metrics_grace_s: float = 1.0, max_extensions: int = 0, grow_on_extend: bool = True) -> None:
        if not timeout_s > 0:
            raise ConfigError(f"--round-timeout must be > 0, got {timeout_s}")
        if max_extensions < 0:
            raise ConfigError(f"--max-extensions must be >= 0 (0: no limit), got {max_extensions}")
        self.sampling = sampling
        self.timeout_s = timeout_s
        self.clock = clock
        self.metrics_grace_s = metrics_grace_s
        self.max_extensions = max_extensions
        #: an extension may ask more clients (not in DP federations: the round was charged for those it asked)
        self.grow_on_extend = grow_on_extend

    @property
    def min_clients(self) -> int:
        return self.sampling.min_clients

    def open(self, number: int, online: Iterable[str], errors: Optional[Mapping[str, ClientError]] = None
             ) -> RoundRecord:
        """A new round asking the sampled online clients, due one timeout from now; a client whose error it cannot
        fix itself (PERMANENT_ERRORS) is not asked."""
        now = self.clock()
        blocked = {c for c, e in (errors or {}).items() if e.permanent}
        pool = set(online) - blocked
        return RoundRecord(number, set(self.sampling.choose(pool, number)), now, now + self.timeout_s,
                           population=len(pool))

    def resume(self, rec: RoundRecord) -> RoundRecord:
        """A round restored after a restart: same clients and updates, a fresh deadline."""
        rec.deadline = self.clock() + self.timeout_s
        return rec

    def complete(self, rec: RoundRecord) -> bool:
        """Every asked client sent its update for this round (accepted, or refused: it sends no other) or is in
        error for it, and the accepted ones make the quorum."""
        return (bool(rec.asked) and rec.asked <= set(rec.reported) | rec.refused | rec.errored
                and self.quorum(rec))

    def due(self, rec: RoundRecord) -> bool:
        return self.clock() >= rec.deadline

    def quorum(self, rec: RoundRecord) -> bool:
        return len(rec.reported) >= self.min_clients

    def pending(self, rec: RoundRecord, available: Iterable[str]) -> Set[str]:
        """Asked clients that may still report: no update accepted or refused yet, not in error for it, available."""
        return (rec.asked & set(available)) - set(rec.reported) - rec.refused - rec.errored

    def exhausted(self, rec: RoundRecord) -> bool:
        return 0 < self.max_extensions <= rec.extensions

    def step(self, rec: RoundRecord, available: Iterable[str],
             errors: Optional[Mapping[str, ClientError]] = None) -> Step:
        """Decide, and for EXTEND also apply the extension to `rec`. `errors`: the clients whose latest status is
        `error`; an asked one in error for this round is settled (recorded in `rec.errored`, once)."""
        now = self.clock()
        errored = sorted(c for c, e in (errors or {}).items() if c in rec.asked and c not in rec.errored
                         and c not in rec.reported and e.settles(rec.number))
        rec.errored.update(errored)
        if self.complete(rec):
            if rec.complete_since is None:
                rec.complete_since = now
            have_metrics = set(rec.metrics) >= set(rec.reported)
            if have_metrics or now - rec.complete_since >= self.metrics_grace_s:
                return Step(CLOSE, errored=errored)
            return Step(WAIT, errored=errored)
        if not self.due(rec):
            return Step(WAIT, errored=errored)
        if self.quorum(rec):
            return Step(CLOSE, errored=errored)
        if self.exhausted(rec):
            return Step(GIVE_UP, errored=errored)
        return Step(EXTEND, self.extend(rec, available), errored)

    def extend(self, rec: RoundRecord, available: Iterable[str]) -> List[str]:
        """Below quorum at the deadline: one more timeout; if the clients that reported plus the pending
        ones cannot reach the quorum, ask more available clients (unless `grow_on_extend` is off). Returns the
        newly asked."""
        rec.deadline = self.clock() + self.timeout_s
        rec.extensions += 1
        available = set(available)
        missing = self.min_clients - len(rec.reported) - len(self.pending(rec, available))
        candidates = available - rec.asked - rec.refused  # refused: sent this round unasked, will not resend
        grow = missing > 0 and self.grow_on_extend
        added = self.sampling.more(candidates, missing, rec.number, rec.extensions) if grow else []
        rec.asked |= set(added)
        return added


class QuorumError(FloraError, RuntimeError):
    """A round stayed below its quorum through `--max-extensions` extensions (the round stays open on disk)."""

    exit_code = EXIT_QUORUM
