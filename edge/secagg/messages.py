"""Every secure-aggregation message, built and parsed in this one module (docs/protocol.md lists them).

Parsing is bounded and exact: a size limit before parsing, JSON objects with exactly the expected
keys, integers in range, ids checked, base64 fields of exact lengths, lists no longer than the round
allows. Anything else is a `MessageError`, whose `reason` the receiver counts and logs; nothing
raises past it. Signatures (`flora.edge.signing`) wrap these bodies and are checked first.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Set, Tuple

import numpy as np

from ..errors import FloraError
from ..protocol import ProtocolError, check_id
from .primitives import KEY_BYTES, NONCE_BYTES, SECRET_BYTES, Context, mac

MAX_JSON_BYTES = 8 << 20
MAX_MEMBERS = 100_000
MALFORMED = "malformed"

# Stages, in order (each names the message the aggregator sends to open it).
ADVERTISE = "advertise-keys"
SHARE = "share-keys"
MASKED = "masked-input"
UNMASK = "unmask"
REVEAL = "reveal"
ABORT = "abort"
STAGES = (ADVERTISE, SHARE, MASKED, UNMASK, REVEAL, ABORT)

# Signature purposes (flora.edge.signing): one per kind of signed body.
P_STAGE = "secagg-stage"
P_KEYS = "secagg-keys"
P_STATEMENT = "secagg-statement"

#: shares and unmask answers carry a Poly1305 tag under a key the client agreed with the aggregator
TAG_MAGIC = b"FLORA-MAC1"

MASKED_MAGIC = b"FLSA1"
TAG_BYTES = 16
SEALED_SHARE_BYTES = 2 * SECRET_BYTES + 16  # both shares and the Poly1305 tag
#: a sealed share in JSON: base64 of nonce || ciphertext (92 bytes), relayed by the aggregator as it came
_SEALED_B64 = re.compile(r"[A-Za-z0-9+/]{123}=")
_HEADER_LEN = struct.Struct("<I")
MAX_CERT_B64 = 8192


class MessageError(FloraError, ValueError):
    """A message that does not follow the protocol."""

    def __init__(self, detail: str, reason: str = MALFORMED) -> None:
        super().__init__(detail)
        self.reason = reason


# -- field checks -------------------------------------------------------------------------------
def load_json(payload: bytes, what: str, max_bytes: int = MAX_JSON_BYTES) -> Dict[str, Any]:
    if len(payload) > max_bytes:
        raise MessageError(f"{what}: {len(payload)} bytes, more than {max_bytes}", "oversized")
    try:
        d = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError(f"{what} is not JSON: {type(exc).__name__}") from None
    if not isinstance(d, dict):
        raise MessageError(f"{what} is not a JSON object")
    return d


def as_object(body: Any, what: str, max_bytes: int = MAX_JSON_BYTES) -> Dict[str, Any]:
    """A body parsed by `load_json`, or the object it was already parsed into (parse once, then dispatch)."""
    return body if isinstance(body, dict) else load_json(body, what, max_bytes)


def exact_keys(d: Any, keys: Set[str], what: str) -> None:
    if not isinstance(d, dict):
        raise MessageError(f"{what} is not an object")
    if set(d) != keys:
        missing, extra = sorted(keys - set(d)), sorted(set(d) - keys)
        raise MessageError(f"{what}: missing {missing}, unexpected {extra[:5]}")


def get_int(d: Mapping[str, Any], key: str, lo: int = 0, hi: int = 2 ** 63) -> int:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise MessageError(f"{key} must be an integer in {lo}..{hi}")
    return v


def get_float(d: Mapping[str, Any], key: str) -> float:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise MessageError(f"{key} must be a finite number")
    return float(v)


def get_str(d: Mapping[str, Any], key: str, max_len: int = 256) -> str:
    v = d[key]
    if not isinstance(v, str) or len(v) > max_len:
        raise MessageError(f"{key} must be a string of at most {max_len} characters")
    return v


def get_id(value: Any, what: str = "client id") -> str:
    try:
        return check_id(value, what)
    except ProtocolError as exc:
        raise MessageError(str(exc)) from None


def get_ids(d: Mapping[str, Any], key: str, max_len: int = MAX_MEMBERS) -> Tuple[str, ...]:
    v = d[key]
    if not isinstance(v, list) or len(v) > max_len:
        raise MessageError(f"{key} must be a list of at most {max_len} ids")
    ids = tuple(get_id(x) for x in v)
    if len(set(ids)) != len(ids):
        raise MessageError(f"{key} lists an id twice")
    return ids


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@functools.lru_cache(maxsize=4096)
def b64_relayed(data: bytes) -> str:
    """b64 of a payload relayed to many clients (a neighbour's keys, a statement): encoded once."""
    return b64(data)


def unb64(v: Any, what: str, size: Optional[int] = None, max_size: int = 1 << 16) -> bytes:
    if not isinstance(v, str) or len(v) > (max_size * 4) // 3 + 4:
        raise MessageError(f"{what} must be base64 of at most {max_size} bytes")
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise MessageError(f"{what} is not base64") from None
    if size is not None and len(raw) != size:
        raise MessageError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


def get_map(d: Mapping[str, Any], key: str, max_len: int = MAX_MEMBERS) -> Dict[str, Any]:
    v = d[key]
    if not isinstance(v, dict) or len(v) > max_len:
        raise MessageError(f"{key} must be an object of at most {max_len} entries")
    for k in v:
        get_id(k)
    return v


def dumps(d: Mapping[str, Any]) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


# -- the context every message names -----------------------------------------------------------
HEADER_KEYS = {"type", "run", "round", "attempt"}


def header(ctx: Context, kind: str) -> Dict[str, Any]:
    return {"type": kind, "run": ctx.run_id, "round": ctx.round, "attempt": ctx.attempt}


def check_header(d: Mapping[str, Any], kind: str, ctx: Context) -> None:
    """The message is of `kind` and for this attempt of this round of this run (else reason `stale`)."""
    if d.get("type") != kind:
        raise MessageError(f"expected a {kind} message, got {str(d.get('type'))[:32]!r}")
    got = (d.get("run"), d.get("round"), d.get("attempt"))
    if got != (ctx.run_id, ctx.round, ctx.attempt):
        raise MessageError(f"a {kind} message for run/round/attempt {got!r:.80}, not {ctx.run_id}/{ctx.round}/"
                           f"{ctx.attempt}", "stale")


def peek_context(body: bytes, federation: str) -> Context:
    """The context a JSON body names (to route it before its type-specific checks)."""
    d = load_json(body, "secagg message")
    try:
        return Context(federation, get_str(d, "run", 64), get_int(d, "round"), get_int(d, "attempt", 0, 1000))
    except KeyError as exc:
        raise MessageError(f"secagg message without {exc}") from None


# -- aggregator -> every client ------------------------------------------------------------------
@dataclass(frozen=True)
class StageMsg:
    """Opens a stage (retained on `secagg/stage`): who is in it, until when, and for share-keys the
    aggregator's X25519 key (masked inputs carry a Poly1305 tag under a key agreed with it)."""

    stage: str
    members: Tuple[str, ...] = ()
    dropped: Tuple[str, ...] = ()
    deadline: float = 0.0
    server_key: bytes = b""
    reason: str = ""

    def to_body(self, ctx: Context) -> bytes:
        return dumps({**header(ctx, "stage"), "stage": self.stage, "members": list(self.members),
                      "dropped": list(self.dropped), "deadline": self.deadline, "server_key": b64(self.server_key),
                      "reason": self.reason})

    @classmethod
    def from_body(cls, body: bytes, ctx: Context) -> StageMsg:
        d = load_json(body, "stage message")
        try:
            exact_keys(d, HEADER_KEYS | {"stage", "members", "dropped", "deadline", "server_key", "reason"}, "stage")
            check_header(d, "stage", ctx)
            stage = get_str(d, "stage")
            if stage not in STAGES:
                raise MessageError(f"unknown stage {stage[:32]!r}")
            key = unb64(d["server_key"], "server_key", max_size=KEY_BYTES)
            if stage == SHARE and len(key) != KEY_BYTES:
                raise MessageError("the share-keys stage carries the aggregator's 32-byte X25519 key")
            return cls(stage, get_ids(d, "members"), get_ids(d, "dropped"), get_float(d, "deadline"), key,
                       get_str(d, "reason", 512))
        except KeyError as exc:
            raise MessageError(f"stage message without {exc}") from None


# -- aggregator -> one client ------------------------------------------------------------------
def seal_b64(nonce: bytes, ciphertext: bytes) -> str:
    return b64(nonce + ciphertext)


def open_b64(text: str) -> Tuple[bytes, bytes]:
    """(nonce, ciphertext) of a sealed share."""
    raw = unb64(text, "sealed share", NONCE_BYTES + SEALED_SHARE_BYTES)
    return raw[:NONCE_BYTES], raw[NONCE_BYTES:]


def sealed_shares(v: Any, what: str, max_entries: int) -> Dict[str, str]:
    """A map of id -> sealed share, each checked by form only: the aggregator relays it undecoded, and only
    its recipient can open (and so authenticate) it."""
    if not isinstance(v, dict) or len(v) > max_entries:
        raise MessageError(f"{what} must be an object of at most {max_entries} sealed shares")
    for k, text in v.items():
        get_id(k)
        if not isinstance(text, str) or not _SEALED_B64.fullmatch(text):
            raise MessageError(f"{what}: a sealed share is base64 of {NONCE_BYTES + SEALED_SHARE_BYTES} bytes")
    return v


def tag_body(key: bytes, body: bytes) -> bytes:
    """`TAG_MAGIC || Poly1305 tag || body` (shares and unmask answers: only the aggregator checks them)."""
    return TAG_MAGIC + mac(key, body) + body


def split_tagged(payload: bytes) -> Tuple[bytes, bytes]:
    """(tag, body) of a tagged payload; MessageError `unsigned` if it carries no tag."""
    start = len(TAG_MAGIC)
    if payload[:start] != TAG_MAGIC or len(payload) < start + TAG_BYTES:
        raise MessageError("the message carries no tag", "unsigned")
    return bytes(payload[start: start + TAG_BYTES]), bytes(payload[start + TAG_BYTES:])


@dataclass(frozen=True)
class InboxMsg:
    """What one client needs for a stage: its neighbours' signed keys (share-keys), the shares sealed for
    it (masked-input), or its neighbours' signed statements (reveal). Unsigned: every value is its
    sender's exact payload, signed by the sender or sealed for this client, so the aggregator (or a
    broker) relays what it cannot forge; what it can do, leave entries out, it can do to any message."""

    stage: str
    client: str
    keys: Dict[str, bytes] = field(default_factory=dict)
    shares: Dict[str, str] = field(default_factory=dict)  # sender -> its sealed share (seal_b64)
    statements: Dict[str, bytes] = field(default_factory=dict)

    def to_body(self, ctx: Context) -> bytes:
        return dumps({**header(ctx, "inbox"), "stage": self.stage, "client": self.client,
                      "keys": {k: b64_relayed(v) for k, v in self.keys.items()},
                      "shares": self.shares,
                      "statements": {k: b64_relayed(v) for k, v in self.statements.items()}})

    @classmethod
    def from_body(cls, body: bytes, ctx: Context, max_entries: int) -> InboxMsg:
        d = load_json(body, "inbox message")
        try:
            exact_keys(d, HEADER_KEYS | {"stage", "client", "keys", "shares", "statements"}, "inbox")
            check_header(d, "inbox", ctx)
            stage = get_str(d, "stage")
            if stage not in (SHARE, MASKED, REVEAL):
                raise MessageError(f"an inbox message for stage {stage[:32]!r}")
            return cls(stage, get_id(d["client"]),
                       {k: unb64(v, "keys", max_size=2 * MAX_CERT_B64) for k, v in
                        get_map(d, "keys", max_entries).items()},
                       sealed_shares(d["shares"], "shares", max_entries),
                       {k: unb64(v, "statements", max_size=MAX_MEMBERS * 80) for k, v in
                        get_map(d, "statements", max_entries).items()})
        except KeyError as exc:
            raise MessageError(f"inbox message without {exc}") from None


# -- client -> aggregator ----------------------------------------------------------------------
@dataclass(frozen=True)
class KeysMsg:
    """advertise-keys: a client's fresh X25519 keys for this attempt (c: sealing shares, s: masks), the
    commitment to its self-mask seed, and its identity certificate; signed by its identity key."""

    client: str
    c_key: bytes
    s_key: bytes
    commit: bytes
    cert: bytes

    def to_body(self, ctx: Context) -> bytes:
        return dumps({**header(ctx, "keys"), "client": self.client, "c_key": b64(self.c_key),
                      "s_key": b64(self.s_key), "commit": b64(self.commit), "cert": b64(self.cert)})

    @classmethod
    def from_body(cls, body: bytes, ctx: Context) -> KeysMsg:
        d = as_object(body, "keys message", 4 * MAX_CERT_B64)
        try:
            exact_keys(d, HEADER_KEYS | {"client", "c_key", "s_key", "commit", "cert"}, "keys")
            check_header(d, "keys", ctx)
            return cls(get_id(d["client"]), unb64(d["c_key"], "c_key", KEY_BYTES),
                       unb64(d["s_key"], "s_key", KEY_BYTES), unb64(d["commit"], "commit", 32),
                       unb64(d["cert"], "cert", max_size=MAX_CERT_B64))
        except KeyError as exc:
            raise MessageError(f"keys message without {exc}") from None


@dataclass(frozen=True)
class SharesMsg:
    """share-keys: for each neighbour, its shares of this client's two secrets, sealed for it."""

    client: str
    shares: Dict[str, str]  # neighbour -> its sealed share (seal_b64)

    def to_body(self, ctx: Context) -> bytes:
        return dumps({**header(ctx, "shares"), "client": self.client, "shares": self.shares})

    @classmethod
    def from_body(cls, body: bytes, ctx: Context, max_entries: int) -> SharesMsg:
        d = as_object(body, "shares message")
        try:
            exact_keys(d, HEADER_KEYS | {"client", "shares"}, "shares")
            check_header(d, "shares", ctx)
            return cls(get_id(d["client"]), sealed_shares(d["shares"], "shares", max_entries))
        except KeyError as exc:
            raise MessageError(f"shares message without {exc}") from None


@dataclass(frozen=True)
class MaskedMsg:
    """masked-input (binary): MAGIC | u32 header length | JSON header | the masked ring elements; the
    header's Poly1305 tag covers the elements under a key agreed with the aggregator for this attempt."""

    client: str
    values: np.ndarray
    tag: bytes

    def to_body(self, ctx: Context) -> bytes:
        bits = self.values.dtype.itemsize * 8
        head = dumps({**header(ctx, "masked"), "client": self.client, "bits": bits, "length": len(self.values),
                      "tag": b64(self.tag)})
        return MASKED_MAGIC + _HEADER_LEN.pack(len(head)) + head + self.values.astype(
            self.values.dtype.newbyteorder("<"), copy=False).tobytes()

    @staticmethod
    def from_body(body: bytes, ctx: Context, bits: int, length: int) -> MaskedMsg:
        """A zero-copy view of the elements; only `length` elements of `bits` bits are accepted."""
        start = len(MASKED_MAGIC) + _HEADER_LEN.size
        if body[: len(MASKED_MAGIC)] != MASKED_MAGIC or len(body) < start:
            raise MessageError("not a masked-input message")
        (size,) = _HEADER_LEN.unpack_from(body, len(MASKED_MAGIC))
        if size > 4096 or start + size > len(body):
            raise MessageError("masked-input header length out of range")
        d = load_json(bytes(body[start: start + size]), "masked-input header")
        try:
            exact_keys(d, HEADER_KEYS | {"client", "bits", "length", "tag"}, "masked-input header")
            check_header(d, "masked", ctx)
            if (get_int(d, "bits"), get_int(d, "length")) != (bits, length):
                raise MessageError(f"masked input of {d['length']} x {d['bits']} bits, expected {length} x {bits}")
            raw = memoryview(body)[start + size:]
            if len(raw) != length * bits // 8:
                raise MessageError(f"masked input holds {len(raw)} bytes, expected {length * bits // 8}")
            dtype = np.dtype(np.uint32 if bits == 32 else np.uint64).newbyteorder("<")
            return MaskedMsg(get_id(d["client"]), np.frombuffer(raw, dtype), unb64(d["tag"], "tag", TAG_BYTES))
        except KeyError as exc:
            raise MessageError(f"masked-input header without {exc}") from None


@dataclass(frozen=True)
class StatementMsg:
    """unmask: which of the signer's neighbours it was told are active and which dropped, signed: the signer
    gives no other answer in this attempt, so a client it lists as active can reveal its own seed."""

    client: str
    active: Tuple[str, ...]
    dropped: Tuple[str, ...]

    def to_body(self, ctx: Context) -> bytes:
        return dumps({**header(ctx, "statement"), "client": self.client, "active": list(self.active),
                      "dropped": list(self.dropped)})

    @classmethod
    def from_body(cls, body: bytes, ctx: Context) -> StatementMsg:
        d = load_json(body, "statement")
        try:
            exact_keys(d, HEADER_KEYS | {"client", "active", "dropped"}, "statement")
            check_header(d, "statement", ctx)
            return cls(get_id(d["client"]), get_ids(d, "active"), get_ids(d, "dropped"))
        except KeyError as exc:
            raise MessageError(f"statement without {exc}") from None


@dataclass(frozen=True)
class UnmaskMsg:
    """unmask: the signed statement, shares of the self-mask seeds of the active neighbours, and shares of
    the mask keys of the dropped ones (never both for one client)."""

    client: str
    statement: bytes  # the signed StatementMsg payload
    seed_shares: Dict[str, bytes]
    key_shares: Dict[str, bytes]

    def to_body(self, ctx: Context) -> bytes:
        return dumps({**header(ctx, "unmask"), "client": self.client, "statement": b64(self.statement),
                      "seed_shares": {k: b64(v) for k, v in self.seed_shares.items()},
                      "key_shares": {k: b64(v) for k, v in self.key_shares.items()}})

    @classmethod
    def from_body(cls, body: bytes, ctx: Context, max_entries: int) -> UnmaskMsg:
        d = as_object(body, "unmask message")
        try:
            exact_keys(d, HEADER_KEYS | {"client", "statement", "seed_shares", "key_shares"}, "unmask")
            check_header(d, "unmask", ctx)
            seeds = {k: unb64(v, "seed share", SECRET_BYTES) for k, v in get_map(d, "seed_shares", max_entries).items()}
            keys = {k: unb64(v, "key share", SECRET_BYTES) for k, v in get_map(d, "key_shares", max_entries).items()}
            if set(seeds) & set(keys):
                raise MessageError("an unmask answer gives both secrets of one client", "double-listed")
            return cls(get_id(d["client"]), unb64(d["statement"], "statement", max_size=MAX_MEMBERS * 80),
                       seeds, keys)
        except KeyError as exc:
            raise MessageError(f"unmask message without {exc}") from None


@dataclass(frozen=True)
class RevealMsg:
    """reveal: the client's own self-mask seed, once enough neighbours signed that it is active."""

    client: str
    seed: bytes

    def to_body(self, ctx: Context) -> bytes:
        return dumps({**header(ctx, "reveal"), "client": self.client, "seed": b64(self.seed)})

    @classmethod
    def from_body(cls, body: bytes, ctx: Context) -> RevealMsg:
        d = as_object(body, "reveal message")
        try:
            exact_keys(d, HEADER_KEYS | {"client", "seed"}, "reveal")
            check_header(d, "reveal", ctx)
            return cls(get_id(d["client"]), unb64(d["seed"], "seed", SECRET_BYTES))
        except KeyError as exc:
            raise MessageError(f"reveal message without {exc}") from None


def client_kind(body: bytes) -> Tuple[str, Any]:
    """(`keys`, `shares`, `masked`, `unmask` or `reveal`, the body as parsed so far): which message a client
    sent; a JSON body comes back as its object, for the message's own `from_body` to check."""
    if body[: len(MASKED_MAGIC)] == MASKED_MAGIC:
        return "masked", body
    d = load_json(body, "secagg message")
    kind = d.get("type")
    if kind not in ("keys", "shares", "unmask", "reveal"):
        raise MessageError(f"unknown secagg message type {str(kind)[:32]!r}")
    return str(kind), d
