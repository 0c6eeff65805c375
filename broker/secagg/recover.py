"""Recovering the sum of the survivors' encodings from the masked sum: remove every survivor's self mask and
every pairwise mask that a dropped client's input would have cancelled. Only sums are ever formed: no
individual input is unmasked (a survivor's seed removes its self mask from the sum, where its pairwise
masks still hide it until they cancel)."""

from __future__ import annotations

import itertools
from typing import Callable, Mapping, Optional, Sequence, Tuple

import numpy as np

from flora.edge.secagg import primitives as p
from flora.edge.secagg.derive import pair_info, self_mask_commit, self_mask_key
from flora.edge.secagg.ring import share_index

#: At most this many t-subsets are tried for one secret when shares do not combine into the committed one.
MAX_SUBSETS = 32


def combine_checked(shares: Mapping[str, bytes], neighbours: Sequence[str], threshold: int,
                    check: Callable[[bytes], bool]) -> Optional[bytes]:
    """The secret that `check` accepts, from t of the holders' shares (trying other subsets when a share is
    wrong); None when there are fewer than t shares or no subset within MAX_SUBSETS checks out."""
    indexed = sorted((share_index(tuple(neighbours), holder), share) for holder, share in shares.items()
                     if holder in neighbours)
    if len(indexed) < threshold:
        return None
    for subset in itertools.islice(itertools.combinations(indexed, threshold), MAX_SUBSETS):
        try:
            secret = p.combine_secret(list(subset))
        except p.CryptoError:
            continue
        if check(secret):
            return secret
    return None


def seed_checker(ctx: p.Context, client: str, commit: bytes) -> Callable[[bytes], bool]:
    return lambda seed: self_mask_commit(ctx, client, seed) == commit


def key_checker(public: bytes) -> Callable[[bytes], bool]:
    def check(raw: bytes) -> bool:
        try:
            return p.x25519_private(raw).public_key().public_bytes_raw() == public
        except (p.CryptoError, ValueError):
            return False
    return check


def remove_masks(total: np.ndarray, ctx: p.Context, seeds: Mapping[str, bytes],
                 dropped_keys: Mapping[str, bytes], neighbours: Mapping[str, Tuple[str, ...]],
                 s_keys: Mapping[str, bytes], survivors: Sequence[str]) -> np.ndarray:
    """`total` (the masked sum, modified in place) less the survivors' self masks and the dropped clients'
    pairwise masks with surviving neighbours."""
    length, dtype = len(total), total.dtype
    for client in survivors:
        total -= p.mask(self_mask_key(ctx, client, seeds[client]), length, dtype)
    alive = set(survivors)
    for dropped, raw in dropped_keys.items():
        private = p.x25519_private(raw)
        for v in neighbours[dropped]:
            if v not in alive:
                continue
            m = p.mask(p.agree(private, s_keys[v], pair_info(ctx, dropped, v)), length, dtype)
            if v < dropped:  # v added +m (its id is the smaller); the dropped one's -m never came
                total -= m
            else:
                total += m
    return total
