"""The aggregator's secure rounds (`flora-aggregator --secure-aggregation`): the state dir and topic side of
`broker.secure_round.SecureRound`, deciding for the aggregator what to publish and when a round closes.

With each round it opens a SecureRound for the enrolled, online clients (the parameters go out in the
signed `round` message), returns every stage (retained, signed) and inbox message to publish, having
first saved the attempts' record (spool/round-N/secagg.json), starts a new attempt after an abort while
attempts are left, and hands back a completed attempt's sum as one partial for the strategy (the sum
is saved first, so a restart between the sum and the commit closes the round with it, once). A restart
in the middle of an attempt aborts it and goes on with the next. The protocol is docs/protocol.md,
"Secure aggregation".
"""

from __future__ import annotations

import dataclasses
import io
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flora.edge.adapter import FlatTensors, Layout
from flora.edge.dp import integer_noise_bound
from flora.edge.errors import ConfigError
from flora.edge.protocol import Topics
from flora.edge.secagg.encoding import Encoding, decode_sum

from .checkpoint import Checkpoint
from .enroll import FederationPKI
from .rounds import RoundRecord, Sampling
from .secagg.server import DONE, Outgoing
from .secure_round import SecureRound, SecureSettings
from .strategies import Strategy

log = logging.getLogger("flora.aggregator")

#: (topic, payload, retain) of a message to publish
Message = Tuple[str, bytes, bool]


def check_secure_aggregation(strategy: Strategy) -> None:
    """ConfigError unless `strategy` can run on a securely aggregated sum: one that looks at each update on its
    own (`needs_individual_updates`: a norm bound, a median, a trimmed mean, central DP's clip) cannot, and
    the sum reaches a strategy as one partial, so its aggregate must be a sum (`folds_partials`)."""
    if strategy.needs_individual_updates or not strategy.folds_partials:
        raise ConfigError(
            f"--secure-aggregation with --strategy {strategy.name}: under secure aggregation the aggregator sees "
            "only the sum of the updates, and this strategy "
            + ("looks at each update on its own" if strategy.needs_individual_updates else "cannot fold a sum")
            + ": use fedavg (or another strategy whose aggregate is a weighted sum)")


def dp_encoding(encoding: Encoding, noise_std: float) -> Encoding:
    """The encoding of a distributed-DP round: weight 1 for every client (DP-FedAvg is unweighted: one device
    moves the sum by at most C) and room for an integer noise share of std `noise_std` (12 sigma; at least 1,
    which also marks a restored round as distributed DP's, z = 0 included)."""
    bound = integer_noise_bound(noise_std, encoding.unit)
    return dataclasses.replace(encoding, max_weight=1, noise_bound=max(bound, 1))


@dataclass
class SecureStep:
    """What the aggregator does for the open secure round now, in this order: re-announce the round (more
    clients were asked), publish `publish`, then fail the round (`fail`) or fold `fold` (a partial and its
    weight) into the strategy and close the round."""

    publish: List[Message] = field(default_factory=list)
    reannounce: bool = False
    fail: Optional[str] = None
    fold: Optional[Tuple[FlatTensors, int]] = None


class SecureAggregation:
    """Secure rounds of one aggregator (see the module docstring); `round` is the open round's, if any."""

    def __init__(self, settings: SecureSettings, checkpoint: Checkpoint, topics: Topics, sampling: Sampling,
                 round_timeout_s: float, layout: Layout, clock: Callable[[], float]) -> None:
        self.settings, self.checkpoint, self.topics = settings, checkpoint, topics
        self.sampling, self.round_timeout_s, self.layout, self.clock = sampling, round_timeout_s, layout, clock
        self.round: Optional[SecureRound] = None
        self.registry: Dict[str, Any] = {}
        self.size = 0  # clients the round's first attempt asked: later ones ask up to as many
        self.backlog: List[Outgoing] = []  # what a restored round publishes once connected
        self.pending_sum: Optional[np.ndarray] = None  # a completed attempt's sum saved before a restart
        self.weight = 0  # the total weight of the round's sum, once folded
        self.start_after = 0.0  # until then the next attempt waits for enough clients
        self.dp = False  # the open round is distributed DP's (weight 1 each, integer noise shares)

    # -- who takes part ----------------------------------------------------------------------------
    def load_registry(self) -> None:
        """The enrolled, unrevoked devices (read at every round: a revoked device is out from the next one)."""
        self.registry = FederationPKI(self.checkpoint.dir, self.topics.federation).identity_keys()

    def eligible(self, clients: Set[str]) -> Set[str]:
        return {c for c in clients if c in self.registry}

    def need(self) -> int:
        """Enrolled clients that must be online before a secure round can complete."""
        n = 2
        while self.settings.min_members(n, self.sampling.min_clients) > n:
            n += 1
        return max(n, self.sampling.min_clients)

    # -- a round -------------------------------------------------------------------------------------
    def _new(self, rec: RoundRecord, run_id: str, signer: Ed25519PrivateKey,
             saved: Optional[Mapping[str, Any]] = None, noise_std: Optional[float] = None) -> SecureRound:
        settings = self.settings
        if noise_std is not None:
            settings = dataclasses.replace(settings, encoding=dp_encoding(settings.encoding, noise_std))
        params = (SecureRound.saved_params(saved) if saved else
                  settings.params(len(rec.asked), self.sampling.min_clients))
        return SecureRound(self.topics.federation, run_id, rec.number, params, self.settings.max_attempts,
                           self.registry, signer, self.layout.numel + 1, self.clock, saved)

    def open(self, rec: RoundRecord, run_id: str, signer: Ed25519PrivateKey,
             noise_std: Optional[float] = None) -> None:
        """The secure round of a round just opened (before it is announced: the announcement names its
        parameters). `noise_std` (None: no DP): distributed DP's noise share per client (each encodes weight 1
        and may add integer noise up to the encoding's `noise_bound`, sized for that std; 0 with z = 0)."""
        self.dp = noise_std is not None
        self.round = self._new(rec, run_id, signer, noise_std=noise_std)
        self.size, self.weight, self.pending_sum, self.backlog = len(rec.asked), 0, None, []
        self._save(rec)

    def announcement_fields(self) -> Dict[str, Any]:
        return {"secagg": self.round.params.to_json()} if self.round is not None else {}

    def start_first(self, rec: RoundRecord) -> List[Message]:
        """Attempt 0: the asked clients advertise their keys once trained, until the round's deadline."""
        assert self.round is not None
        out = self._messages(rec, self.round.start(set(rec.asked), rec.deadline))
        p = self.round.params
        log.info("round %d: secure aggregation attempt 0 (k=%d, t=%d, %d-bit ring) open to %d client(s)",
                 rec.number, p.shares, p.threshold, p.bits, len(self.round.server.asked))
        return out

    def restore(self, rec: RoundRecord, run_id: str, signer: Ed25519PrivateKey) -> None:
        """After a restart: abort the attempt that was running (or close the round with a saved sum)."""
        self.load_registry()
        saved = self.checkpoint.load_secure(rec.number)
        self.round = self._new(rec, run_id, signer, saved)
        self.dp = self.round.params.encoding.noise_bound > 0
        self.size = int(saved.get("size", len(rec.asked))) if saved else len(rec.asked)
        self.weight, self.backlog = 0, []
        blob = self.checkpoint.load_secure_sum(rec.number)
        self.pending_sum = np.load(io.BytesIO(blob), allow_pickle=False) if blob is not None else None
        if self.pending_sum is None and saved:
            self.backlog = self.round.interrupted(saved)
            self._save(rec)
        self.start_after = self.clock() + self.round_timeout_s  # statuses come in after connecting
        log.info("round %d: secure aggregation resumed %s", rec.number,
                 "with the sum of a completed attempt" if self.pending_sum is not None else
                 f"after {len(self.round.attempts)} attempt(s); the next one starts with fresh keys")

    def _save(self, rec: RoundRecord) -> None:
        assert self.round is not None
        self.checkpoint.save_secure(rec.number, {**self.round.to_json(), "size": self.size})

    def _messages(self, rec: RoundRecord, out: List[Outgoing]) -> List[Message]:
        """Save the attempts' record (before anything of it is published); the stage retained, inboxes not."""
        if out:
            self._save(rec)
        return [(self.topics.secagg_stage, o.payload, True) if o.kind == "stage" else
                (self.topics.secagg_inbox(o.client), o.payload, False) for o in out]

    def handle(self, client: str, payload: bytes) -> None:
        if self.round is None:
            log.debug("a secure-aggregation message from %s while no secure round is open: dropped", client)
            return
        rej = self.round.handle(client, payload)
        if rej is not None:
            log.info("round %d: secure aggregation refused a message from %s: %s: %s", self.round.number, client,
                     rej.reason, rej.detail[:200])

    def tick(self, rec: RoundRecord, available: Set[str], current: Mapping[str, np.ndarray]) -> SecureStep:
        """What to do for the open secure round now; `available`: clients online and not in error; `current`:
        the round's global."""
        sr = self.round
        assert sr is not None
        step = SecureStep()
        if self.backlog:
            step.publish, self.backlog = self._messages(rec, self.backlog), []
        if self.pending_sum is not None:
            total, self.pending_sum = self.pending_sum, None
            return self._close(rec, total, current, step)
        if not sr.running:
            if sr.outcome is None:
                self._next_attempt(rec, available, step)
            return step
        out, outcome = sr.step()
        step.publish += self._messages(rec, out)
        if outcome is None:
            return step
        if outcome.status == DONE:
            assert outcome.total is not None
            self._save(rec)  # the completed attempt and who is in its sum
            buf = io.BytesIO()
            np.save(buf, outcome.total, allow_pickle=False)
            self.checkpoint.save_secure_sum(rec.number, buf.getvalue())  # a restart closes the round with it
            return self._close(rec, outcome.total, current, step)
        log.warning("round %d: secure aggregation attempt %d aborted: %s (%d attempt(s) left)", rec.number,
                    sr.attempt, outcome.reason, sr.attempts_left)
        self.start_after = self.clock() + self.round_timeout_s
        return step

    def _next_attempt(self, rec: RoundRecord, available: Set[str], step: SecureStep) -> None:
        sr = self.round
        assert sr is not None
        if sr.attempts_left < 1:
            reasons = "; ".join(f"attempt {a.attempt}: {a.reason}" for a in sr.attempts)
            step.fail = f"secure aggregation aborted {len(sr.attempts)} time(s) ({reasons})"
            return
        candidates = sr.candidates(available)
        asked = candidates & rec.asked
        want = min(self.size, sr.params.clients)
        if len(asked) < want:  # others in place of those gone (seeded, as an extension asks more)
            asked |= set(self.sampling.more(candidates - rec.asked, want - len(asked), rec.number, 1000 + sr.attempt))
        if len(asked) < sr.params.min_members() and self.clock() < self.start_after:
            return  # wait for clients to come (back) online, at most a round timeout
        if not asked <= rec.asked:
            rec.asked |= asked
            step.reannounce = True  # the newly asked learn of the round (and train)
        step.publish += self._messages(rec, sr.start(asked, self.clock() + self.round_timeout_s))
        log.info("round %d: secure aggregation attempt %d (fresh keys) open to %d client(s)", rec.number,
                 sr.attempt, len(sr.server.asked))

    def _close(self, rec: RoundRecord, total: np.ndarray, current: Mapping[str, np.ndarray],
               step: SecureStep) -> SecureStep:
        """The unmasked sum as one partial: (sum of weights) x global + sum of weighted deltas, and the weight."""
        sr = self.round
        assert sr is not None
        wsum, weight = decode_sum(total, sr.params.encoding)
        if weight < 1 or len(wsum) != self.layout.numel:
            step.fail = f"the secure sum is unusable (weight {weight}, {len(wsum)} elements)"
            return step
        if self.dp and weight != len(sr.survivors):  # each encodes weight 1: the sum's weight counts its shares
            step.fail = (f"the secure sum's weight {weight} is not its {len(sr.survivors)} survivors: a client "
                         "encoded another weight than 1 in a distributed-DP round")
            return step
        flat = np.concatenate([np.ravel(current[name]).astype(np.float64) for name, _, _, _ in self.layout.entries])
        step.fold = (FlatTensors(flat * weight + wsum, self.layout), weight)
        self.weight = weight
        rec.reported = {c: 0 for c in sr.survivors}  # who is in the sum; their weights are in its total only
        rec.bytes_received = sr.bytes_up
        log.info("round %d: secure aggregation done: the sum of %d client(s), total weight %d", rec.number,
                 len(sr.survivors), weight)
        return step

    def row(self) -> Dict[str, Any]:
        """The history row's secure-aggregation fields (and its `samples`: the sum's total weight)."""
        if self.round is None:
            return {}
        return {**self.round.row(), "samples": self.weight}

    def closed(self) -> List[Message]:
        """The round was committed: clear the retained stage (clients that connect later meet none)."""
        was, self.round = self.round, None
        return [(self.topics.secagg_stage, b"", True)] if was is not None else []
