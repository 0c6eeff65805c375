"""The agent's side of secure aggregation across a round's attempts, as a pure state machine (injected clock,
no I/O): which `secagg/stage` and `secagg/inbox/<id>` messages are this device's now, when it joins an
attempt with fresh keys (a new `SecAggClient`), and when its update counts as given.

The agent trains the round, hands the session its update (`trained`: the adapter minus the round's
global, flat, and its weight), and feeds it every stage and inbox message; each call returns what to
publish on `secagg/up/<id>` and what to log. The update is never sent in the clear.

Given: once an unmask request of an attempt in which this device sent its masked input lists it as
active, the aggregator can have its masked input unmasked in a sum. From then on the update is
*given*: the session drops it, never joins another attempt of the round with it (a second sum over
other clients would give it away by difference) and the agent records the round as submitted.
An attempt that aborts before that leaves the update in hand for the next attempt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Set, Tuple

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .. import signing
from ..identity import DeviceIdentity
from .client import DONE, FAILED, MASKED_SENT, UNMASKED, Refused, SecAggClient
from .messages import ADVERTISE, P_STAGE, UNMASK, MessageError, StageMsg, peek_context
from .params import SecAggParams
from .primitives import Context

Clock = Callable[[], float]

INFO, WARNING = "info", "warning"


@dataclass
class SessionStep:
    """What a call asks of the agent: publish `replies` (in order) on its `secagg/up/<id>` topic, log `notes`
    ((level, text)), and with `given` record the round as submitted (its update may now be in a sum)."""

    replies: List[bytes] = field(default_factory=list)
    notes: List[Tuple[str, str]] = field(default_factory=list)
    given: bool = False


class SecureSession:
    """One device's secure aggregation, round after round (`begin` names the round)."""

    def __init__(self, identity: DeviceIdentity, ca: x509.Certificate, aggregator_key: Ed25519PublicKey,
                 clock: Clock = time.time) -> None:
        self.identity, self.ca, self.aggregator_key, self.clock = identity, ca, aggregator_key, clock
        self.me, self.federation = identity.device_id, identity.federation
        self.round: Optional[Tuple[str, int]] = None  # (run_id, round) of the secure round held
        self.params: Optional[SecAggParams] = None
        self.delta: Optional[np.ndarray] = None
        self.noise: Optional[np.ndarray] = None
        self.weight = 0
        self.client: Optional[SecAggClient] = None
        self.masked_in: Set[int] = set()  # attempts of this round in which this device sent its masked input
        self.given = False
        self.stage: Optional[bytes] = None  # the latest signed stage payload (kept until its round is known)

    # -- the round -----------------------------------------------------------------------------------
    def begin(self, run_id: str, round_: int, params: SecAggParams) -> SessionStep:
        """A secure round is announced (again, after an extension or a restart: nothing changes then)."""
        if self.round == (run_id, round_):
            return SessionStep()
        self.end()
        self.round, self.params = (run_id, round_), params
        return self._replay()

    def end(self) -> None:
        """No secure round any more (a plain round, the next round, a new run): forget this one's update."""
        self.round = self.params = self.delta = self.noise = self.client = None
        self.weight, self.masked_in, self.given = 0, set(), False

    @property
    def holding(self) -> Optional[Tuple[str, int]]:
        """(run_id, round) whose trained update waits here for an attempt (the agent does not train it again)."""
        return self.round if self.delta is not None else None

    def trained(self, delta: np.ndarray, weight: int, noise: Optional[np.ndarray] = None) -> SessionStep:
        """The round's update (adapter minus global, flat, in the adapter's layout) and its weight; `noise`:
        distributed DP's integer noise share (fixed point, added before masking; the same in every attempt)."""
        if self.round is None or self.given:
            return SessionStep()
        self.delta, self.weight, self.noise = np.ravel(delta), int(weight), noise
        return self._replay()

    def _replay(self) -> SessionStep:
        """The stage held, once more: it may be an advertise-keys stage waiting for the update or the round."""
        return self.on_stage(self.stage) if self.stage else SessionStep()

    # -- messages --------------------------------------------------------------------------------------
    def on_stage(self, payload: bytes) -> SessionStep:
        step = SessionStep()
        if not payload:  # the aggregator cleared the retained stage after a round
            return step
        try:
            body = signing.verify(self.aggregator_key, P_STAGE, self.federation, payload)
            ctx = peek_context(body, self.federation)
            stage = StageMsg.from_body(body, ctx)
        except signing.SignatureError as exc:
            step.notes.append((WARNING, f"refused a secure-aggregation stage message: {exc.reason}: {exc.detail}"))
            return step
        except MessageError as exc:
            step.notes.append((WARNING, f"ignored a malformed secure-aggregation stage message: {exc}"))
            return step
        self.stage = payload
        if self.round != (ctx.run_id, ctx.round) or self.params is None:
            return step  # not the round held (yet): kept for `begin`
        if stage.stage == UNMASK and ctx.attempt in self.masked_in and self.me in stage.members:
            self._give(step, ctx)
        if stage.stage == ADVERTISE:
            return self._advertise(stage, ctx, step)
        client = self.client
        if client is None or client.ctx != ctx or client.state in (DONE, FAILED):
            return step
        return self._call(step, client, client.on_stage, payload)

    def on_inbox(self, payload: bytes) -> SessionStep:
        step = SessionStep()
        client = self.client
        if client is None or client.state in (DONE, FAILED):
            return step
        try:
            ctx = peek_context(payload, self.federation)
        except MessageError as exc:
            step.notes.append((WARNING, f"ignored a malformed secure-aggregation inbox message: {exc}"))
            return step
        if ctx != client.ctx:
            return step  # another attempt's (a late copy)
        return self._call(step, client, client.on_inbox, payload)

    def tick(self) -> SessionStep:
        """The attempt's open stage passed its deadline without the next message: it is over for this device."""
        step = SessionStep()
        if self.client is not None and self.client.expired():
            step.notes.append((INFO, f"round {self.client.ctx.round}: secure-aggregation attempt "
                                     f"{self.client.ctx.attempt} timed out here; waiting for the next attempt"))
        return step

    # -- inside an attempt -----------------------------------------------------------------------------
    def _advertise(self, stage: StageMsg, ctx: Context, step: SessionStep) -> SessionStep:
        if self.client is not None and self.client.ctx.attempt >= ctx.attempt:
            return step  # the retained copy of an attempt already joined (or an older one)
        if self.given or self.delta is None or self.me not in stage.members:
            return step  # given already, still training, or not asked in this attempt
        assert self.params is not None
        try:
            self.client = SecAggClient(ctx, self.identity, self.ca, self.aggregator_key, self.params, self.delta,
                                       self.weight, self.clock, noise=self.noise)
        except ValueError as exc:  # an update that cannot be encoded: nothing is sent
            step.notes.append((WARNING, f"round {ctx.round}: cannot take part in secure aggregation: {exc}"))
            return step
        step.replies.append(self.client.advertise())
        step.notes.append((INFO, f"round {ctx.round}: joined secure-aggregation attempt {ctx.attempt} "
                                 "(fresh keys)"))
        return step

    def _call(self, step: SessionStep, client: SecAggClient, fn, payload: bytes) -> SessionStep:
        try:
            reply = fn(payload)
        except Refused as exc:
            step.notes.append((WARNING, f"round {client.ctx.round}: secure-aggregation attempt {client.ctx.attempt} "
                                        f"refused: {exc.reason}: {exc.detail}"))
            return step
        if client.state in (MASKED_SENT, UNMASKED, DONE):
            self.masked_in.add(client.ctx.attempt)
        if reply is not None:
            step.replies.append(reply)
        return step

    def _give(self, step: SessionStep, ctx: Context) -> None:
        if self.given:
            return
        self.given, self.delta, self.noise = True, None, None
        step.given = True
        step.notes.append((INFO, f"round {ctx.round}: the update is in secure-aggregation attempt {ctx.attempt}'s "
                                 "unmask: it is given, and never joins another attempt"))
