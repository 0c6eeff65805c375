"""Split a labelled training set among simulated clients: iid, Dirichlet label skew, or K-class shards."""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

SCHEMES = "iid, dirichlet:ALPHA (ALPHA > 0), shards:K (K >= 1 classes per client)"


class PartitionError(ValueError):
    pass


def parse_scheme(scheme: str) -> Tuple[str, float]:
    name, _, arg = scheme.partition(":")
    try:
        if name == "iid" and not arg:
            return "iid", 0.0
        if name == "dirichlet" and float(arg) > 0:
            return "dirichlet", float(arg)
        if name == "shards" and int(arg) >= 1:
            return "shards", float(int(arg))
    except ValueError:
        pass
    raise PartitionError(f"unknown partition {scheme!r}; use one of: {SCHEMES}")


def partition(labels: np.ndarray, num_clients: int, scheme: str, seed: int = 0) -> List[np.ndarray]:
    """Disjoint index arrays, one per client, covering every sample; no client is empty."""
    labels = np.asarray(labels)
    if num_clients < 1:
        raise PartitionError("need at least one client")
    if len(labels) < num_clients:
        raise PartitionError(f"{len(labels)} samples cannot give {num_clients} clients one sample each")
    kind, arg = parse_scheme(scheme)
    rng = np.random.default_rng(seed)
    if kind == "iid":
        parts = np.array_split(rng.permutation(len(labels)), num_clients)
    elif kind == "dirichlet":
        parts = _dirichlet(labels, num_clients, arg, rng)
    else:
        parts = _shards(labels, num_clients, int(arg), rng)
    parts = _fill_empty([np.sort(np.asarray(p, dtype=np.int64)) for p in parts])
    return parts


def _dirichlet(labels: np.ndarray, n: int, alpha: float, rng: np.random.Generator) -> List[np.ndarray]:
    parts: List[list] = [[] for _ in range(n)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(n, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].extend(chunk.tolist())
    return [np.array(p) for p in parts]


def _shards(labels: np.ndarray, n: int, k: int, rng: np.random.Generator) -> List[np.ndarray]:
    """Sort by label, cut into n*k shards, deal k shards to each client (McMahan et al.'s split)."""
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, n * k)
    deal = rng.permutation(n * k)
    return [np.concatenate([shards[s] for s in deal[c * k : (c + 1) * k]]) for c in range(n)]


def _fill_empty(parts: List[np.ndarray]) -> List[np.ndarray]:
    """Move one sample from the largest client to each empty one (deterministic)."""
    for i, part in enumerate(parts):
        if len(part) == 0:
            donor = int(np.argmax([len(p) for p in parts]))
            parts[i], parts[donor] = parts[donor][-1:], parts[donor][:-1]
    return parts


def label_histogram(labels: np.ndarray, parts: List[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients x classes) counts."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def label_skew(labels: np.ndarray, parts: List[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each client's label distribution and the global one (0 = iid)."""
    return histogram_skew(label_histogram(labels, parts, num_classes))


def histogram_skew(hist: np.ndarray) -> float:
    """label_skew from a (clients x classes) count matrix; the global distribution is its column sum."""
    hist = np.asarray(hist, dtype=float)
    local = hist / hist.sum(axis=1, keepdims=True)
    overall = hist.sum(axis=0) / hist.sum()
    return float(0.5 * np.abs(local - overall).sum(axis=1).mean())
