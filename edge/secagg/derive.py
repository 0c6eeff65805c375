"""The keys both sides derive from a round's context: every one bound to the parties and its purpose."""

from __future__ import annotations

import hashlib

from . import primitives as p

AGGREGATOR = "aggregator"  # the other party of a masked input's tag key


def self_mask_commit(ctx: p.Context, client: str, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed (advertised with the keys; checks a revealed or recovered seed)."""
    return hashlib.sha256(ctx.info(client, client, "self-mask-commit") + b"\0" + seed).digest()


def self_mask_key(ctx: p.Context, client: str, seed: bytes) -> bytes:
    return p.hkdf(seed, ctx.info(client, client, "self-mask"))


def pair_info(ctx: p.Context, a: str, b: str) -> bytes:
    """The pairwise mask's context: the same for both ends (ids in order)."""
    lo, hi = sorted((a, b))
    return ctx.info(lo, hi, "pairwise-mask")


def share_info(ctx: p.Context, src: str, dst: str) -> bytes:
    """Sealing `src`'s shares for `dst` (a direction of its own: never the same key both ways)."""
    return ctx.info(src, dst, "share")


def channel_info(ctx: p.Context, client: str) -> bytes:
    """X25519(client's c key, the aggregator's per-attempt key): the client's authenticated channel to it."""
    return ctx.info(client, AGGREGATOR, "channel")


def tag_key(ctx: p.Context, client: str, channel: bytes, purpose: str) -> bytes:
    """The one-time Poly1305 key of one message (`shares`, `masked-input`, `unmask`) on a client's channel."""
    return p.hkdf(channel, ctx.info(client, AGGREGATOR, purpose))
