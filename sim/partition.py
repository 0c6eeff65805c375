"""Split a labelled training set among simulated clients: iid, Dirichlet label skew, or K-class shards.

`partition` returns one sorted index array per client; together they cover every sample exactly
once and none is empty. `label_histogram` and `label_skew` describe the result for reports.
"""

from __future__ import annotations

import math
from typing import FrozenSet, List, Sequence, Tuple

import numpy as np

from flora.edge.errors import FloraError

SCHEMES = "iid, dirichlet:ALPHA (ALPHA > 0, e.g. dirichlet:0.5), shards:K (K >= 1 classes per client, e.g. shards:2)"
_DEAL_TRIES = 50


class PartitionError(FloraError, ValueError):
    """A partition scheme is malformed or cannot be met by the data."""


def parse_scheme(scheme: str) -> Tuple[str, float]:
    """'iid' -> ('iid', 0), 'dirichlet:0.5' -> ('dirichlet', 0.5), 'shards:2' -> ('shards', 2.0)."""
    name, sep, arg = str(scheme).strip().lower().partition(":")
    try:
        if name == "iid" and not sep:
            return "iid", 0.0
        if name == "dirichlet" and math.isfinite(float(arg)) and float(arg) > 0:
            return "dirichlet", float(arg)
        if name == "shards" and int(arg) >= 1:
            return "shards", float(int(arg))
    except ValueError:
        pass
    raise PartitionError(f"unknown partition scheme {scheme!r}; use one of: {SCHEMES}")


def partition(labels: np.ndarray, num_clients: int, scheme: str, seed: int = 0) -> List[np.ndarray]:
    """Disjoint sorted int64 index arrays, one per client, covering every sample; no client is empty.

    * `iid`: a seeded shuffle cut into near-equal parts.
    * `dirichlet:ALPHA`: each class is spread over the clients by shares drawn from Dirichlet(ALPHA);
      small ALPHA (0.1) gives few classes per client, large (100) is close to iid.
    * `shards:K`: samples sorted by class are cut into num_clients*K equal shards and each client is
      dealt K of them, of K different classes where the shards allow it (McMahan et al. 2017).

    A client left empty by the draw gets one sample from the largest client (deterministic).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise PartitionError(f"labels must be a 1-D array, got shape {labels.shape}")
    kind, arg = parse_scheme(scheme)
    if num_clients < 1:
        raise PartitionError(f"need at least one client, got {num_clients}")
    if len(labels) < num_clients:
        raise PartitionError(f"{len(labels)} samples cannot give {num_clients} clients one sample each")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        parts = np.array_split(rng.permutation(len(labels)), num_clients)
    elif kind == "dirichlet":
        parts = _dirichlet(labels, num_clients, arg, rng)
    else:
        parts = _shards(labels, num_clients, int(arg), rng)
    return _fill_empty([np.sort(np.asarray(p, dtype=np.int64)) for p in parts])


def _dirichlet(labels: np.ndarray, n: int, alpha: float, rng: np.random.Generator) -> List[np.ndarray]:
    chunks: List[List[np.ndarray]] = [[] for _ in range(n)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(n, alpha)))[:-1] * len(idx)).astype(np.int64)
        for client, chunk in enumerate(np.split(idx, cuts)):
            chunks[client].append(chunk)
    return [np.concatenate(c) for c in chunks]


def _shards(labels: np.ndarray, n: int, k: int, rng: np.random.Generator) -> List[np.ndarray]:
    num_classes = len(np.unique(labels))
    if k > num_classes:
        raise PartitionError(f"shards:{k} asks for {k} classes per client but the data has {num_classes}")
    shuffled = rng.permutation(len(labels))
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]  # grouped by class, shuffled within
    shards = np.array_split(order, n * k)
    deal = _deal([frozenset(np.unique(labels[s]).tolist()) for s in shards], n, k, rng)
    return [np.concatenate([shards[s] for s in hand]) for hand in deal]


def _deal(shard_classes: Sequence[FrozenSet[int]], n: int, k: int, rng: np.random.Generator) -> List[List[int]]:
    """k shards per client, no class twice in a hand: seeded greedy deals (emptiest hand first), retried.

    Falls back to dealing every n-th shard of the class-sorted order, which keeps classes apart
    whenever each class spans at most n shards (always when the shards are class-pure and k <= classes).
    """
    for _ in range(_DEAL_TRIES):
        hands: List[List[int]] = [[] for _ in range(n)]
        held: List[set] = [set() for _ in range(n)]
        for s in rng.permutation(len(shard_classes)):
            open_hands = [c for c in range(n) if len(hands[c]) < k and not held[c] & shard_classes[s]]
            if not open_hands:
                break
            emptiest = min(len(hands[c]) for c in open_hands)
            c = int(rng.choice([c for c in open_hands if len(hands[c]) == emptiest]))
            hands[c].append(int(s))
            held[c] |= shard_classes[s]
        else:
            return hands
    return [list(range(c, n * k, n)) for c in range(n)]


def _fill_empty(parts: List[np.ndarray]) -> List[np.ndarray]:
    """Move one sample (its highest index) from the largest client to each empty one."""
    for i, part in enumerate(parts):
        if len(part) == 0:
            donor = int(np.argmax([len(p) for p in parts]))
            parts[i], parts[donor] = parts[donor][-1:], parts[donor][:-1]
    return parts


def label_histogram(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients x classes) sample counts."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=num_classes) for p in parts])


def label_skew(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance of the clients' label distributions from the global one.

    0 when every client has the global class mix; near 1 - 1/classes when each holds one class.
    """
    return histogram_skew(label_histogram(labels, parts, num_classes))


def histogram_skew(hist: np.ndarray) -> float:
    """`label_skew` from a (clients x classes) count matrix; the global mix is its column sum; empty rows skipped."""
    hist = np.asarray(hist, dtype=np.float64)
    hist = hist[hist.sum(axis=1) > 0]
    if len(hist) == 0:
        raise ValueError("the label histogram is empty")
    local = hist / hist.sum(axis=1, keepdims=True)
    overall = hist.sum(axis=0) / hist.sum()
    return float(0.5 * np.abs(local - overall).sum(axis=1).mean())
