"""The client's side of one secure-aggregation attempt, as a pure state machine (no I/O, injected clock).

The agent trains first, then feeds the aggregator's messages in (`on_stage`, `on_inbox`); each returns
the payload to publish once the stage has what it needs, or None. Anything that does not check out
raises `Refused` with a reason; the attempt is then over for this client (the aggregator counts it
as dropped and, if it must, retries the round with fresh keys).

What the client refuses, beyond malformed or unsigned messages: a neighbour whose keys are not signed
by a device the federation's CA certified; an unmask request whose active and dropped sets intersect,
that omits one of its neighbours, that does not list the client as active, or whose active set is
below the threshold; a second unmask request in one attempt; and revealing its own seed before enough
neighbours signed that it is active (so fewer than t could ever hand over shares of its mask key).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Dict, Optional, Set, Tuple

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .. import signing
from ..identity import DeviceIdentity, IdentityError, verify_identity_cert
from . import primitives as p
from .derive import channel_info, pair_info, self_mask_commit, self_mask_key, share_info, tag_key
from .encoding import Encoding, encode
from .messages import (
    ABORT,
    MASKED,
    P_KEYS,
    P_STAGE,
    P_STATEMENT,
    REVEAL,
    SHARE,
    UNMASK,
    InboxMsg,
    KeysMsg,
    MaskedMsg,
    MessageError,
    RevealMsg,
    SharesMsg,
    StageMsg,
    StatementMsg,
    UnmaskMsg,
    open_b64,
    seal_b64,
    tag_body,
)
from .params import SecAggParams
from .ring import neighbourhoods, share_index

Clock = Callable[[], float]

# Client states: waiting for the aggregator to open the next stage.
ADVERTISED = "advertised"
SHARED = "shared"
MASKED_SENT = "masked-sent"
UNMASKED = "unmasked"
DONE = "done"
FAILED = "failed"

# Refusal reasons.
DOUBLE_LISTED = "double-listed"
BELOW_THRESHOLD = "below-threshold"
INCONSISTENT = "inconsistent"
BAD_PEER = "bad-peer"
NOT_MEMBER = "not-member"
TIMEOUT = "timeout"
ABORTED = "aborted"


class Refused(Exception):
    """The client stops this attempt; `reason` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SecAggClient:
    """One attempt: `advertise()` first, then `on_stage`/`on_inbox` for every aggregator message."""

    def __init__(self, ctx: p.Context, identity: DeviceIdentity, ca: x509.Certificate,
                 aggregator_key: Ed25519PublicKey, params: SecAggParams, delta: np.ndarray, weight: int,
                 clock: Clock = time.time, noise: Optional[np.ndarray] = None) -> None:
        """`delta`: the trained adapter minus the round's global, flat; `weight`: the sample count (capped at
        the encoding's max_weight); `noise`: integer noise added before masking (distributed DP)."""
        if identity.federation != ctx.federation:
            raise ValueError(f"identity of federation {identity.federation}, round of {ctx.federation}")
        self.ctx, self.me, self.identity, self.ca = ctx, identity.device_id, identity, ca
        self.aggregator_key, self.params, self.clock = aggregator_key, params, clock
        enc: Encoding = params.encoding
        self.delta = np.ravel(delta)  # a view where it can be: encoded only when the masked input is made
        self.weight = min(int(weight), enc.max_weight)
        self.noise = noise
        if self.weight < 1 or not np.all(np.isfinite(self.delta)):
            raise ValueError("the update must be finite and its weight a positive integer")
        self.length = len(self.delta) + 1
        self.clipped: Optional[int] = None
        self.c_key, self.c_pub = p.new_x25519()
        self.s_key, self.s_pub = p.new_x25519()
        self.seed = os.urandom(p.SECRET_BYTES)
        self.state = ADVERTISED
        self.deadline: Optional[float] = None
        self.stage: Optional[StageMsg] = None
        self.inbox: Optional[InboxMsg] = None
        self.neighbours: Tuple[str, ...] = ()
        self.peers: Dict[str, KeysMsg] = {}  # verified keys of the neighbours
        self.peer_ids: Dict[str, Ed25519PublicKey] = {}
        self.channel = b""  # agreed with the aggregator's per-attempt key at share-keys
        self.members2: Set[str] = set()
        self.members1: Set[str] = set()
        self.held: Dict[str, bytes] = {}  # neighbour -> the 64 bytes of its shares this client holds
        self.reason: Optional[str] = None

    # -- outgoing ---------------------------------------------------------------------------
    def _sign(self, purpose: str, body: bytes) -> bytes:
        return signing.sign(self.identity.key, purpose, self.ctx.federation, body)

    def advertise(self) -> bytes:
        commit = self_mask_commit(self.ctx, self.me, self.seed)
        msg = KeysMsg(self.me, self.c_pub, self.s_pub, commit, self.identity.cert_der)
        return self._sign(P_KEYS, msg.to_body(self.ctx))

    # -- incoming ---------------------------------------------------------------------------
    def on_stage(self, payload: bytes) -> Optional[bytes]:
        """A `secagg/stage` message; the reply to publish, if the stage has all it needs."""
        stage = self._guard(lambda: StageMsg.from_body(
            signing.verify(self.aggregator_key, P_STAGE, self.ctx.federation, payload), self.ctx))
        if stage.stage == ABORT:
            self._fail(ABORTED, f"the aggregator aborted the attempt: {stage.reason}")
        self.stage, self.deadline = stage, stage.deadline
        return self._advance()

    def on_inbox(self, payload: bytes) -> Optional[bytes]:
        inbox = self._guard(lambda: InboxMsg.from_body(payload, self.ctx, self.params.clients))
        if inbox.client != self.me:
            self._fail(INCONSISTENT, f"an inbox message for {inbox.client}")
        self.inbox = inbox
        return self._advance()

    def expired(self) -> bool:
        """True (and the attempt failed) once the open stage's deadline, plus one stage timeout of grace for
        the next stage message (sent when the aggregator closes the stage, at the deadline at the latest, then
        delivered), passed without it."""
        if (self.state in (DONE, FAILED) or self.deadline is None
                or self.clock() < self.deadline + self.params.stage_timeout_s):
            return False
        self.state, self.reason = FAILED, TIMEOUT
        return True

    def _guard(self, parse):
        if self.state in (DONE, FAILED):
            raise Refused(self.reason or self.state, "this attempt is over")
        try:
            return parse()
        except signing.SignatureError as exc:
            self._fail(exc.reason, exc.detail)
        except MessageError as exc:
            self._fail(exc.reason, str(exc))

    def _fail(self, reason: str, detail: str):
        self.state, self.reason = FAILED, reason
        raise Refused(reason, detail)

    def _advance(self) -> Optional[bytes]:
        stage, inbox = self.stage, self.inbox
        if stage is None:
            return None
        want = {ADVERTISED: SHARE, SHARED: MASKED, MASKED_SENT: UNMASK, UNMASKED: REVEAL}.get(self.state)
        if stage.stage != want:
            if self.state == UNMASKED and stage.stage == UNMASK:
                return None  # the same request again (a retained copy): answered once already
            self._fail(INCONSISTENT, f"stage {stage.stage} while waiting for {want}")
        if stage.stage == UNMASK:
            return self._unmask(stage)
        if inbox is None or inbox.stage != stage.stage:
            return None  # its inbox message has not come yet
        if stage.stage == SHARE:
            return self._share(stage, inbox)
        if stage.stage == MASKED:
            return self._masked(stage, inbox)
        return self._reveal(inbox)

    # -- share-keys -----------------------------------------------------------------------------
    def _share(self, stage: StageMsg, inbox: InboxMsg) -> bytes:
        members = set(stage.members)
        if self.me not in members:
            self._fail(NOT_MEMBER, "the share-keys stage does not list this client")
        if len(members) > self.params.clients:
            self._fail(INCONSISTENT, f"{len(members)} members, the parameters allow {self.params.clients}")
        self.members1 = members
        self.neighbours = neighbourhoods(members, self.params.shares, self.ctx)[self.me]
        if len(self.neighbours) < self.params.threshold:
            self._fail(BELOW_THRESHOLD, f"{len(self.neighbours)} neighbours, threshold {self.params.threshold}")
        for v in self.neighbours:
            self.peers[v] = self._verify_peer(v, inbox.keys.get(v))
        self.channel = self._agree(self.c_key, stage.server_key, channel_info(self.ctx, self.me), "the aggregator")
        seed_shares = p.split_secret(self.seed, self.params.threshold, len(self.neighbours))
        key_shares = p.split_secret(p.private_bytes(self.s_key), self.params.threshold, len(self.neighbours))
        sealed = {}
        for v, (i, b_share), (j, s_share) in zip(self.neighbours, seed_shares, key_shares):
            assert i == j == share_index(self.neighbours, v)
            info = share_info(self.ctx, self.me, v)
            key = self._agree(self.c_key, self.peers[v].c_key, info, v)
            sealed[v] = seal_b64(*p.seal(key, b_share + s_share, info))
        self.state, self.stage, self.inbox = SHARED, None, None
        return tag_body(self._tag_key("shares"), SharesMsg(self.me, sealed).to_body(self.ctx))

    def _tag_key(self, purpose: str) -> bytes:
        return tag_key(self.ctx, self.me, self.channel, purpose)

    def _verify_peer(self, peer: str, payload: Optional[bytes]) -> KeysMsg:
        if payload is None:
            self._fail(BAD_PEER, f"no keys of neighbour {peer}")
        try:
            keys = KeysMsg.from_body(signing.body_of(payload), self.ctx)
            if keys.client != peer:
                raise MessageError(f"keys of {keys.client} given as {peer}")
            public = verify_identity_cert(keys.cert, self.ca, peer, self.ctx.federation)
            signing.verify(public, P_KEYS, self.ctx.federation, payload)
        except (MessageError, IdentityError, signing.SignatureError) as exc:
            self._fail(BAD_PEER, f"the keys of neighbour {peer} do not check out: {exc}")
        self.peer_ids[peer] = public
        return keys

    def _agree(self, private, public_raw: bytes, info: bytes, peer: str) -> bytes:
        try:
            return p.agree(private, public_raw, info)
        except p.CryptoError as exc:
            self._fail(BAD_PEER, f"key agreement with {peer} failed: {exc}")

    # -- masked-input -----------------------------------------------------------------------
    def _masked(self, stage: StageMsg, inbox: InboxMsg) -> bytes:
        members = set(stage.members)
        if self.me not in members:
            self._fail(NOT_MEMBER, "the masked-input stage does not list this client")
        if not members <= self.members1:
            self._fail(INCONSISTENT, "the masked-input stage lists clients that were not in share-keys")
        self.members2 = members
        for v, sealed in inbox.shares.items():
            if v not in self.peers or v not in members:
                continue  # not a neighbour: nothing of ours
            info = share_info(self.ctx, v, self.me)
            try:
                nonce, ciphertext = open_b64(sealed)
                plain = p.open_sealed(p.agree(self.c_key, self.peers[v].c_key, info), nonce, ciphertext, info)
            except (p.CryptoError, MessageError):
                continue  # a share we cannot read is one we do not hold: recovery needs t of the others
            self.held[v] = plain
        encoded = encode(self.delta, self.weight, self.params.encoding, self.params.bits, noise=self.noise)
        self.clipped = encoded.clipped
        out = encoded.values
        dtype = out.dtype
        out += p.mask(self_mask_key(self.ctx, self.me, self.seed), self.length, dtype)
        for v in self.neighbours:
            if v not in members:
                continue
            m = p.mask(p.agree(self.s_key, self.peers[v].s_key, pair_info(self.ctx, self.me, v)), self.length, dtype)
            if self.me < v:
                out += m
            else:
                out -= m
        tag = p.mac(self._tag_key("masked-input"), out.view(np.uint8))
        self.state, self.stage, self.inbox = MASKED_SENT, None, None
        self.delta = self.noise = None  # the update is not needed again in this attempt
        return MaskedMsg(self.me, out, tag).to_body(self.ctx)

    # -- unmask -------------------------------------------------------------------------------
    def _unmask(self, stage: StageMsg) -> bytes:
        active, dropped = set(stage.members), set(stage.dropped)
        both = active & dropped
        if both:
            self._fail(DOUBLE_LISTED, f"{sorted(both)[:5]} listed both active and dropped")
        if self.me not in active:
            self._fail(NOT_MEMBER, "the unmask request does not list this client as active")
        if len(active) < max(self.params.threshold, self.params.min_survivors):
            self._fail(BELOW_THRESHOLD, f"{len(active)} active clients, below the threshold "
                                        f"{max(self.params.threshold, self.params.min_survivors)}")
        if not (active | dropped) <= self.members2:
            self._fail(INCONSISTENT, "the unmask request names clients that sent no shares")
        mine = set(self.neighbours) & self.members2
        if not mine <= active | dropped:
            self._fail(INCONSISTENT, f"the unmask request omits neighbours {sorted(mine - active - dropped)[:5]}")
        act, drop = tuple(sorted(mine & active)), tuple(sorted(mine & dropped))
        statement = self._sign(P_STATEMENT, StatementMsg(self.me, act, drop).to_body(self.ctx))
        seeds = {v: self.held[v][: p.SECRET_BYTES] for v in act if v in self.held}
        keys = {v: self.held[v][p.SECRET_BYTES:] for v in drop if v in self.held}
        self.state, self.stage, self.inbox = UNMASKED, None, None
        return tag_body(self._tag_key("unmask"), UnmaskMsg(self.me, statement, seeds, keys).to_body(self.ctx))

    # -- reveal -------------------------------------------------------------------------------
    def _reveal(self, inbox: InboxMsg) -> bytes:
        """Reveal the own seed only if at most t - 1 holders of our mask-key shares could still hand them over."""
        vouched = set()
        for v, payload in inbox.statements.items():
            if v not in self.peer_ids:
                continue
            try:
                st = StatementMsg.from_body(signing.verify(self.peer_ids[v], P_STATEMENT, self.ctx.federation,
                                                           payload), self.ctx)
            except (MessageError, signing.SignatureError):
                continue
            if st.client == v and self.me in st.active and self.me not in st.dropped:
                vouched.add(v)
        need = len(self.neighbours) - self.params.threshold + 1
        if len(vouched) < need:
            self._fail(BELOW_THRESHOLD, f"{len(vouched)} neighbours vouched that this client is active, "
                                        f"{need} needed before it reveals its seed")
        self.state, self.stage, self.inbox = DONE, None, None
        return RevealMsg(self.me, self.seed).to_body(self.ctx)  # authenticated by the signed commitment
