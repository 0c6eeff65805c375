"""The aggregator's side of one secure-aggregation attempt, as a pure state machine (injected clock, no I/O).

Stages: advertise-keys -> share-keys -> masked-input -> unmask -> reveal. Each opens with a signed
`stage` message to every client (and per-client `inbox` messages where a client needs something of
its own) and closes when every expected client answered or at its deadline. A stage that ends with
too few clients, or a secret that cannot be recovered, aborts the attempt; the aggregator then
retries the round with fresh keys. Masked inputs are added into one running sum as they arrive
(memory flat in the number of clients); no individual input is ever unmasked, stored or logged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Set, Tuple

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509 import load_der_x509_certificate

from flora.edge import signing
from flora.edge.secagg import primitives as p
from flora.edge.secagg.derive import channel_info, tag_key
from flora.edge.secagg.encoding import dtype_of
from flora.edge.secagg.messages import (
    ABORT,
    ADVERTISE,
    MASKED,
    P_KEYS,
    P_STAGE,
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
    client_kind,
    split_tagged,
)
from flora.edge.secagg.params import SecAggParams
from flora.edge.secagg.ring import neighbourhoods

from .recover import combine_checked, key_checker, remove_masks, seed_checker

Clock = Callable[[], float]

RUNNING = "running"
DONE = "done"
ABORTED = "aborted"

#: the message each stage waits for
EXPECTS = {ADVERTISE: "keys", SHARE: "shares", MASKED: "masked", UNMASK: "unmask", REVEAL: "reveal"}
#: how each client message is authenticated: `keys` signed by the device's identity key; `shares`, `masked`
#: (in its header) and `unmask` tagged on the channel agreed with the aggregator's key; `reveal` by the
#: signed commitment to the seed
TAGGED = ("shares", "unmask")


@dataclass(frozen=True)
class Outgoing:
    """A message to publish: `stage` to every client (retained), or `inbox` to `client`."""

    kind: str
    payload: bytes
    client: Optional[str] = None


@dataclass(frozen=True)
class Rejection:
    client: str
    reason: str
    detail: str


@dataclass
class Outcome:
    """How the attempt ended: DONE with the unmasked sum of the survivors' encodings, or ABORTED."""

    status: str
    survivors: Tuple[str, ...] = ()
    dropped: Tuple[str, ...] = ()
    total: Optional[np.ndarray] = None
    reason: str = ""
    stats: Dict[str, float] = field(default_factory=dict)


class _Reject(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class SecAggServer:
    """One attempt of one round: `start()`, then `handle()` every client message and `step()` regularly."""

    def __init__(self, ctx: p.Context, params: SecAggParams, asked: Set[str],
                 registry: Mapping[str, Ed25519PublicKey], signer: Ed25519PrivateKey, length: int,
                 advertise_deadline: float, clock: Clock = time.time) -> None:
        """`length`: elements of an encoding (the adapter's plus one for the weight); `registry`: the enrolled
        devices' identity keys; `signer`: the aggregator's key."""
        if len(asked) > params.clients:
            raise ValueError(f"{len(asked)} clients asked, the parameters allow {params.clients}")
        self.ctx, self.params, self.asked = ctx, params, set(asked)
        self.registry, self.signer, self.length, self.clock = registry, signer, length, clock
        self.stage = ADVERTISE
        self.deadline = advertise_deadline
        self.status = RUNNING
        self.keys: Dict[str, KeysMsg] = {}
        self.key_payloads: Dict[str, bytes] = {}
        self.rings: Dict[str, Tuple[str, ...]] = {}
        self.u1: Set[str] = set()
        self.u2: Set[str] = set()
        self.u3: Set[str] = set()
        self.dropped: Set[str] = set()
        self.sealed: Dict[str, Dict[str, str]] = {}  # recipient -> sender -> its sealed share, relayed as it came
        self.channels: Dict[str, bytes] = {}  # client -> the key agreed with it
        self.answered: Set[str] = set()  # clients whose message for the open stage was accepted
        self.seed_shares: Dict[str, Dict[str, bytes]] = {}  # of -> holder -> share
        self.key_shares: Dict[str, Dict[str, bytes]] = {}
        self.statements: Dict[str, bytes] = {}
        self.seeds: Dict[str, bytes] = {}
        self.server_key, self.server_pub = p.new_x25519()
        self.sum = np.zeros(length, dtype_of(params.bits))
        self.rejections: List[Rejection] = []
        self.outcome: Optional[Outcome] = None
        self.timings: Dict[str, float] = {}

    # -- sending ------------------------------------------------------------------------------
    def _stage_msg(self, msg: StageMsg) -> Outgoing:
        return Outgoing("stage", signing.sign(self.signer, P_STAGE, self.ctx.federation, msg.to_body(self.ctx)))

    @staticmethod
    def _inbox_of(msg: InboxMsg, ctx: p.Context) -> Outgoing:
        return Outgoing("inbox", msg.to_body(ctx), msg.client)

    def start(self) -> List[Outgoing]:
        """The advertise-keys stage message: asked clients that finished training advertise their keys."""
        return [self._stage_msg(StageMsg(ADVERTISE, tuple(sorted(self.asked)), deadline=self.deadline))]

    # -- receiving ------------------------------------------------------------------------------
    def handle(self, client: str, payload: bytes) -> Optional[Rejection]:
        """Take one client message (from the client's own topic); a Rejection (also kept in `rejections`) if
        it is refused. Never raises for what a client sends."""
        start = time.perf_counter()
        try:
            self._handle(client, payload)
        except _Reject as why:
            rej = Rejection(client, why.reason, str(why))
            self.rejections.append(rej)
            return rej
        except MessageError as exc:
            rej = Rejection(client, exc.reason, str(exc))
            self.rejections.append(rej)
            return rej
        except signing.SignatureError as exc:
            rej = Rejection(client, exc.reason, exc.detail)
            self.rejections.append(rej)
            return rej
        finally:
            self.timings["handle_s"] = self.timings.get("handle_s", 0.0) + time.perf_counter() - start
        return None

    def _handle(self, client: str, payload: bytes) -> None:
        if self.status != RUNNING:
            raise _Reject("late", f"the attempt is {self.status}")
        if client not in self.registry:
            raise _Reject("not-enrolled", f"{client} is not an enrolled device (or was revoked)")
        signed = signing.is_signed(payload)
        tag, body = split_tagged(payload) if payload[:10] == b"FLORA-MAC1" else (None, payload)
        body = signing.split(payload)[1] if signed else body
        kind, parsed = client_kind(body)
        if kind != EXPECTS[self.stage]:
            raise _Reject("late" if _order(kind) < _order(EXPECTS[self.stage]) else "early",
                          f"a {kind} message during {self.stage}")
        if client in self.answered:
            raise _Reject("duplicate", f"a second {kind} message from {client}")
        expected = {ADVERTISE: self.asked, SHARE: self.u1, MASKED: self.u2, UNMASK: self.u3, REVEAL: self.u3}
        if client not in expected[self.stage]:
            raise _Reject("not-member", f"{client} is not in the {self.stage} stage")
        if kind == "keys":
            if not signed:
                raise _Reject(signing.UNSIGNED, "unsigned keys")
            signing.verify(self.registry[client], P_KEYS, self.ctx.federation, payload)
        elif kind in TAGGED:
            if tag is None:
                raise _Reject(signing.UNSIGNED, f"a {kind} message without its tag")
            self._check_tag(client, kind, body, tag)
        getattr(self, f"_on_{kind}")(client, parsed, payload)
        self.answered.add(client)

    def _on_keys(self, client: str, body, payload: bytes) -> None:
        msg = KeysMsg.from_body(body, self.ctx)
        self._same_client(msg.client, client)
        try:
            cert_key = load_der_x509_certificate(msg.cert).public_key().public_bytes_raw()
        except (ValueError, AttributeError):
            raise _Reject("bad-certificate", "the keys carry no usable identity certificate") from None
        if cert_key != self.registry[client].public_bytes_raw():
            raise _Reject("bad-certificate", "the identity certificate is not the enrolled key's")
        self.keys[client], self.key_payloads[client] = msg, bytes(payload)

    def _on_shares(self, client: str, body, payload: bytes) -> None:
        msg = SharesMsg.from_body(body, self.ctx, self.params.shares)
        self._same_client(msg.client, client)
        if set(msg.shares) != set(self.rings[client]):
            raise _Reject("inconsistent", "shares not for exactly the client's neighbours")
        for v, sealed in msg.shares.items():
            self.sealed.setdefault(v, {})[client] = sealed

    def _check_tag(self, client: str, purpose: str, data, tag: bytes) -> None:
        try:
            if client not in self.channels:
                self.channels[client] = p.agree(self.server_key, self.keys[client].c_key,
                                                channel_info(self.ctx, client))
            p.check_mac(tag_key(self.ctx, client, self.channels[client], purpose), data, tag)
        except p.CryptoError as exc:
            raise _Reject("bad-mac", f"the {purpose} message does not authenticate: {exc}") from None

    def _on_masked(self, client: str, body, payload: bytes) -> None:
        msg = MaskedMsg.from_body(body, self.ctx, self.params.bits, self.length)
        self._same_client(msg.client, client)
        self._check_tag(client, "masked-input", msg.values.view(np.uint8), msg.tag)
        np.add(self.sum, msg.values, out=self.sum)  # wraps in the ring
        self.u3.add(client)

    def _on_unmask(self, client: str, body, payload: bytes) -> None:
        msg = UnmaskMsg.from_body(body, self.ctx, self.params.shares)
        self._same_client(msg.client, client)
        # the statement is relayed to the neighbours, who check its signature; here only what it says
        st = StatementMsg.from_body(signing.body_of(msg.statement), self.ctx)
        ring = set(self.rings[client]) & self.u2
        if (st.client, set(st.active), set(st.dropped)) != (client, ring & self.u3, ring & self.dropped):
            raise _Reject("inconsistent", "the statement is not the unmask request the client was sent")
        if not set(msg.seed_shares) <= ring & self.u3 or not set(msg.key_shares) <= ring & self.dropped:
            raise _Reject("inconsistent", "shares of clients that are not the client's active/dropped neighbours")
        for of, share in msg.seed_shares.items():
            self.seed_shares.setdefault(of, {})[client] = share
        for of, share in msg.key_shares.items():
            self.key_shares.setdefault(of, {})[client] = share
        self.statements[client] = msg.statement

    def _on_reveal(self, client: str, body, payload: bytes) -> None:
        msg = RevealMsg.from_body(body, self.ctx)
        self._same_client(msg.client, client)
        if not seed_checker(self.ctx, client, self.keys[client].commit)(msg.seed):
            raise _Reject("bad-seed", "the revealed seed is not the committed one")
        self.seeds[client] = msg.seed

    @staticmethod
    def _same_client(named: str, topic: str) -> None:
        if named != topic:
            raise _Reject("client-mismatch", f"a message naming {named} on {topic}'s topic")

    # -- time -----------------------------------------------------------------------------------
    def step(self) -> Tuple[List[Outgoing], Optional[Outcome]]:
        """Close the open stage when every expected client answered or its deadline passed; returns the
        messages to publish and, once the attempt ended, its outcome."""
        if self.status != RUNNING:
            return [], self.outcome
        expected = {ADVERTISE: self.asked, SHARE: self.u1, MASKED: self.u2, UNMASK: self.u3, REVEAL: self.u3}
        if self.answered < expected[self.stage] and self.clock() < self.deadline:
            return [], None
        start = time.perf_counter()
        out = getattr(self, f"_close_{self.stage.replace('-', '_')}")()
        self.timings[f"close_{self.stage}_s"] = time.perf_counter() - start
        return out, self.outcome

    def _abort(self, reason: str) -> List[Outgoing]:
        self.status = ABORTED
        self.outcome = Outcome(ABORTED, tuple(sorted(self.u3)), tuple(sorted(self.dropped)), reason=reason)
        self.sum = np.zeros(0, self.sum.dtype)
        return [self._stage_msg(StageMsg(ABORT, reason=reason))]

    def _enough(self, members: Set[str], stage: str) -> Optional[str]:
        if len(members) < self.params.min_members():
            return f"{len(members)} client(s) completed {stage}, {self.params.min_members()} needed"
        return None

    def _open(self, stage: str, members: Set[str], dropped: Set[str] = frozenset(), key: bytes = b"") -> Outgoing:
        self.stage, self.answered = stage, set()
        self.deadline = self.clock() + self.params.stage_timeout_s
        return self._stage_msg(StageMsg(stage, tuple(sorted(members)), tuple(sorted(dropped)), self.deadline, key))

    def _close_advertise_keys(self) -> List[Outgoing]:
        self.u1 = set(self.keys)
        short = self._enough(self.u1, ADVERTISE)
        if short:
            return self._abort(short)
        self.rings = neighbourhoods(self.u1, self.params.shares, self.ctx)
        out = [self._open(SHARE, self.u1, key=self.server_pub)]
        for u in sorted(self.u1):
            keys = {v: self.key_payloads[v] for v in self.rings[u]}
            out.append(self._inbox_of(InboxMsg(SHARE, u, keys=keys), self.ctx))
        return out

    def _close_share_keys(self) -> List[Outgoing]:
        self.u2 = set(self.answered)
        short = self._enough(self.u2, SHARE)
        if short:
            return self._abort(short)
        out = [self._open(MASKED, self.u2)]
        for v in sorted(self.u2):
            mine = {u: s for u, s in self.sealed.get(v, {}).items() if u in self.u2}
            out.append(self._inbox_of(InboxMsg(MASKED, v, shares=mine), self.ctx))
        self.sealed = {}
        return out

    def _close_masked_input(self) -> List[Outgoing]:
        self.dropped = self.u2 - self.u3
        short = self._enough(self.u3, MASKED)
        if short:
            return self._abort(short)
        t = self.params.threshold
        for d in sorted(self.dropped):
            holders = set(self.rings[d]) & self.u3
            if len(holders) < t:
                return self._abort(f"{d} dropped and only {len(holders)} of its neighbours remain, {t} needed")
        return [self._open(UNMASK, self.u3, self.dropped)]

    def _close_unmask(self) -> List[Outgoing]:
        t = self.params.threshold
        for d in sorted(self.dropped):
            have = len(self.key_shares.get(d, {}))
            if have < t:
                return self._abort(f"{have} share(s) of dropped client {d}'s mask key came back, {t} needed")
        out = [self._open(REVEAL, self.u3)]
        for u in sorted(self.u3):
            vouch = {v: self.statements[v] for v in self.rings[u] if v in self.statements}
            out.append(self._inbox_of(InboxMsg(REVEAL, u, statements=vouch), self.ctx))
        return out

    def _close_reveal(self) -> List[Outgoing]:
        t = self.params.threshold
        for u in sorted(self.u3 - set(self.seeds)):  # did not reveal: recover its seed from t shares
            seed = combine_checked(self.seed_shares.get(u, {}), self.rings[u], t,
                                   seed_checker(self.ctx, u, self.keys[u].commit))
            if seed is None:
                return self._abort(f"the self-mask seed of {u} can be neither revealed nor recovered")
            self.seeds[u] = seed
        dropped_keys = {}
        for d in sorted(self.dropped):
            raw = combine_checked(self.key_shares.get(d, {}), self.rings[d], t, key_checker(self.keys[d].s_key))
            if raw is None:
                return self._abort(f"the mask key of dropped client {d} cannot be recovered from its shares")
            dropped_keys[d] = raw
        survivors = sorted(self.u3)
        total = remove_masks(self.sum, self.ctx, self.seeds, dropped_keys, self.rings,
                             {u: k.s_key for u, k in self.keys.items()}, survivors)
        self.sum = np.zeros(0, total.dtype)
        self.status = DONE
        self.outcome = Outcome(DONE, tuple(survivors), tuple(sorted(self.dropped)), total)
        return []


def _order(kind: str) -> int:
    return ("keys", "shares", "masked", "unmask", "reveal").index(kind)
