"""One round of secure aggregation across its attempts, as a pure state machine (injected clock, no I/O).

The aggregator (broker/aggregator.py, `--secure-aggregation`) opens a `SecureRound` with the round,
feeds it every `secagg/up/<id>` message (`handle`), calls `step` from its event loop and publishes what
comes back; it saves `to_json()` (spool/round-N/secagg.json) before it publishes anything a step
returned, so a restarted aggregator never reuses an attempt number and knows whose inputs may already
be unmaskable. An attempt is one `flora.broker.secagg.SecAggServer` (fresh keys on every side); its
outcome's sum is folded into the strategy as one partial (docs/protocol.md, "Secure aggregation").

Retries: an aborted attempt is followed by another (attempt + 1, fresh keys) until `max_attempts`
attempts ran, among the round's clients still available and not *exposed*. A client is exposed once an
attempt opened its unmask stage listing it as active: its neighbours may then hand the aggregator
shares of its self-mask seed, so its masked input can be unmasked in a sum. It never enters another
attempt of the round with the same update (two sums over sets that differ by one client would give
that client's update away) and its agent counts the round as submitted. A restart of the aggregator
aborts the attempt in progress (its masked sum lived in memory only): it counts as one of the attempts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from flora.edge import signing
from flora.edge.errors import ConfigError
from flora.edge.secagg.encoding import Encoding
from flora.edge.secagg.messages import ABORT, P_STAGE, REVEAL, UNMASK, StageMsg
from flora.edge.secagg.params import SecAggParams
from flora.edge.secagg.primitives import Context
from flora.edge.secagg.ring import default_shares, default_threshold

from .secagg.server import ABORTED, DONE, Outcome, Outgoing, Rejection, SecAggServer

Clock = Callable[[], float]

#: The rejection of a plain `update/<id>` in a secure round: never read, spooled or folded.
PLAIN_UPDATE = "plain-update"
#: A restarted aggregator aborts the attempt it was in with this reason.
RESTARTED = "the aggregator restarted"


@dataclass(frozen=True)
class SecureSettings:
    """`--shares`, `--threshold` (None: the defaults for the round's size), the encoding, `--stage-timeout`,
    `--max-attempts`."""

    shares: Optional[int] = None
    threshold: Optional[int] = None
    encoding: Encoding = field(default_factory=Encoding)
    stage_timeout_s: float = 60.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"--max-attempts must be >= 1, got {self.max_attempts}")
        if self.threshold is not None and self.shares is None:
            raise ConfigError("--threshold needs --shares (the default threshold follows the default shares)")
        if self.shares is not None:  # checked now, with room for every client of a neighbourhood
            self.params(self.shares + 1, 2)

    def params(self, clients: int, min_clients: int = 2) -> SecAggParams:
        """The parameters of a round of at most `clients` members that needs `min_clients` survivors
        (ParamsError, exit 2, for unsound ones)."""
        k = self.shares if self.shares is not None else default_shares(clients)
        t = self.threshold if self.threshold is not None else default_threshold(k)
        return SecAggParams.sized(max(clients, 2), k, t, self.encoding, stage_timeout_s=self.stage_timeout_s,
                                  min_survivors=max(2, min_clients))

    def min_members(self, clients: int, min_clients: int = 2) -> int:
        """Clients a round of `clients` needs online before it can complete at all."""
        return self.params(clients, min_clients).min_members()


@dataclass
class AttemptRecord:
    """How one attempt ended (a history row keeps the list)."""

    attempt: int
    status: str  # DONE, ABORTED
    asked: int
    survivors: int = 0
    dropped: int = 0
    reason: str = ""

    def to_json(self) -> Dict[str, Any]:
        return {"attempt": self.attempt, "status": self.status, "asked": self.asked, "survivors": self.survivors,
                "dropped": self.dropped, "reason": self.reason}


class SecureRound:
    """The attempts of one round: `start(asked, deadline)` opens the next one, `handle` and `step` drive it."""

    def __init__(self, federation: str, run_id: str, number: int, params: SecAggParams, max_attempts: int,
                 registry: Mapping[str, Ed25519PublicKey], signer: Ed25519PrivateKey, length: int,
                 clock: Clock = time.time, saved: Optional[Mapping[str, Any]] = None) -> None:
        """`length`: elements of one encoding (the adapter's and the weight); `registry`: the enrolled
        devices' identity keys; `saved`: `to_json()` of this round before a restart."""
        self.federation, self.run_id, self.number = federation, run_id, number
        self.params, self.max_attempts = params, max_attempts
        self.registry, self.signer, self.length, self.clock = registry, signer, length, clock
        self.attempt = -1  # the attempt running or last run
        self.exposed: Set[str] = set()
        self.attempts: List[AttemptRecord] = []
        self.server: Optional[SecAggServer] = None
        self.outcome: Optional[Outcome] = None  # the DONE outcome, once there is one
        self.rejections: Dict[str, int] = {}
        self.bytes_up = 0
        self.survivors: Tuple[str, ...] = ()  # of the attempt that completed (kept across a restart)
        if saved:
            self.attempt = int(saved["attempt"])
            self.exposed = set(saved.get("exposed", ()))
            self.attempts = [AttemptRecord(**a) for a in saved.get("attempts", ())]
            self.survivors = tuple(saved.get("survivors", ()))

    # -- state ---------------------------------------------------------------------------------
    def to_json(self) -> Dict[str, Any]:
        return {"round": self.number, "params": self.params.to_json(), "attempt": self.attempt,
                "running": self.running, "exposed": sorted(self.exposed),
                "attempts": [a.to_json() for a in self.attempts], "survivors": list(self.survivors)}

    @staticmethod
    def saved_params(saved: Mapping[str, Any]) -> SecAggParams:
        return SecAggParams.from_json(saved["params"])

    @property
    def running(self) -> bool:
        return self.server is not None and self.server.status not in (DONE, ABORTED)

    @property
    def attempts_left(self) -> int:
        return self.max_attempts - len(self.attempts)

    def interrupted(self, saved: Mapping[str, Any]) -> List[Outgoing]:
        """After a restart: the abort of the attempt that was running (if one was), counted as an attempt."""
        if not saved.get("running") or self.attempt < 0:
            return []
        self.attempts.append(AttemptRecord(self.attempt, ABORTED, 0, reason=RESTARTED))
        return [self._stage(StageMsg(ABORT, reason=RESTARTED), self.attempt)]

    def _stage(self, msg: StageMsg, attempt: int) -> Outgoing:
        ctx = Context(self.federation, self.run_id, self.number, attempt)
        return Outgoing("stage", signing.sign(self.signer, P_STAGE, self.federation, msg.to_body(ctx)))

    # -- attempts --------------------------------------------------------------------------------
    def candidates(self, available: Set[str]) -> Set[str]:
        """Who the next attempt may ask among `available`: enrolled, not exposed."""
        return {c for c in available if c in self.registry} - self.exposed

    def start(self, asked: Set[str], advertise_deadline: float) -> List[Outgoing]:
        """Open the next attempt (fresh keys) asking `asked` (the exposed and the unenrolled left out)."""
        if self.running:
            raise RuntimeError(f"round {self.number}: attempt {self.attempt} is still running")
        if self.attempts_left < 1:
            raise RuntimeError(f"round {self.number}: all {self.max_attempts} attempts were made")
        self.attempt += 1
        asked = self.candidates(asked)
        ctx = Context(self.federation, self.run_id, self.number, self.attempt)
        self.server = SecAggServer(ctx, self.params, asked, self.registry, self.signer, self.length,
                                   advertise_deadline, self.clock)
        return self.server.start()

    def handle(self, client: str, payload: bytes) -> Optional[Rejection]:
        """One client message; a Rejection if it is refused (between attempts everything is `late`)."""
        self.bytes_up += len(payload)
        if self.server is None or not self.running:
            rej = Rejection(client, "late", "no secure-aggregation attempt is running")
        else:
            rej = self.server.handle(client, payload)
        if rej is not None:
            self.rejections[rej.reason] = self.rejections.get(rej.reason, 0) + 1
        return rej

    def step(self) -> Tuple[List[Outgoing], Optional[Outcome]]:
        """Advance the running attempt; (messages to publish, its outcome once it ended)."""
        server = self.server
        if server is None or not self.running:
            return [], None
        out, outcome = server.step()
        if server.stage in (UNMASK, REVEAL):  # the unmask request went out: these inputs are unmaskable
            self.exposed |= server.u3
        if outcome is not None:
            self.attempts.append(AttemptRecord(self.attempt, outcome.status, len(server.asked),
                                               len(outcome.survivors), len(outcome.dropped), outcome.reason))
            if outcome.status == DONE:
                self.outcome, self.survivors = outcome, tuple(outcome.survivors)
        return out, outcome

    @property
    def deadline(self) -> Optional[float]:
        return self.server.deadline if self.running and self.server is not None else None

    def row(self) -> Dict[str, Any]:
        """What the round's history row says about its secure aggregation."""
        out = self.outcome
        return {"secure_aggregation": {
            "shares": self.params.shares, "threshold": self.params.threshold, "bits": self.params.bits,
            "attempts": [a.to_json() for a in self.attempts],
            "survivors": list(self.survivors), "dropped": list(out.dropped) if out else [],
            "rejection_counts": dict(sorted(self.rejections.items())), "bytes_up": self.bytes_up,
        }}
