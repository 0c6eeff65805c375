"""Neighbourhoods on a shuffled ring: each client shares keys and masks with k others, not with all n.

The ring's order is a hash of the public round context and the sorted member list, so every client
computes the same neighbourhoods from the member list the aggregator announces, and the aggregator
cannot place clients on the ring at will. Each member's neighbours are the k/2 before and the k/2
after it (k even: the relation is symmetric); with n - 1 <= k every member neighbours every other.
"""

from __future__ import annotations

import hashlib
import math
from typing import Dict, Iterable, List, Tuple

from .primitives import Context


def default_shares(clients: int) -> int:
    """k ≈ 2·log2(n), even, at least 4, but at most n - 1 rounded down to even (and never below 2): a
    neighbourhood holds at most the n - 1 others, and t of them must remain to recover a dropped client."""
    k = max(4, 2 * math.ceil(math.log2(max(clients, 2))))
    cap = (clients - 1) - (clients - 1) % 2
    return max(2, min(k, cap))


def default_threshold(shares: int) -> int:
    """The smallest t > k/2."""
    return shares // 2 + 1


def ring_order(members: Iterable[str], ctx: Context) -> List[str]:
    """The members in ring order: sorted by SHA-256 of (context, sorted member list, id)."""
    ordered = sorted(set(members))
    digest = hashlib.sha256(ctx.info("", "", "ring") + b"\0" + "\0".join(ordered).encode()).digest()
    return sorted(ordered, key=lambda m: hashlib.sha256(digest + m.encode()).digest())


def neighbourhoods(members: Iterable[str], shares: int, ctx: Context) -> Dict[str, Tuple[str, ...]]:
    """Each member's neighbours, sorted by id (their position there, + 1, is the Shamir share index)."""
    if shares < 2 or shares % 2:
        raise ValueError(f"the number of shares k must be even and >= 2, got {shares}")
    order = ring_order(members, ctx)
    n = len(order)
    if n - 1 <= shares:
        return {m: tuple(sorted(set(order) - {m})) for m in order}
    half = shares // 2
    out = {}
    for i, m in enumerate(order):
        near = {order[(i + d) % n] for d in range(-half, half + 1) if d}
        out[m] = tuple(sorted(near))
    return out


def share_index(neighbours: Tuple[str, ...], holder: str) -> int:
    """The Shamir index (1-based) of the share that `holder` keeps of its neighbour's secrets."""
    return neighbours.index(holder) + 1
