"""Splitting a training set among simulated clients."""

from __future__ import annotations

import numpy as np
import pytest

from sim.partition import PartitionError, label_histogram, label_skew, partition

LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 10 balanced classes


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.5", "dirichlet:0.05", "shards:2"])
def test_every_client_gets_samples_and_the_parts_cover_everything_once(scheme):
    parts = partition(LABELS, 7, scheme, seed=0)
    assert len(parts) == 7 and all(len(p) > 0 for p in parts)
    merged = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(merged, np.arange(len(LABELS)))


def test_seeded_and_deterministic():
    a = partition(LABELS, 5, "dirichlet:0.5", seed=3)
    b = partition(LABELS, 5, "dirichlet:0.5", seed=3)
    c = partition(LABELS, 5, "dirichlet:0.5", seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_label_skew_follows_the_requested_scheme():
    skew = {s: np.mean([label_skew(LABELS, partition(LABELS, 5, s, seed), 10) for seed in range(5)])
            for s in ("iid", "dirichlet:100", "dirichlet:0.5", "dirichlet:0.1")}
    assert skew["iid"] < 0.1 and skew["dirichlet:100"] < 0.1
    assert skew["dirichlet:0.1"] > skew["dirichlet:0.5"] > 0.25 > skew["iid"]
    iid_hist = label_histogram(LABELS, partition(LABELS, 5, "iid", 0), 10)
    assert iid_hist.min() >= 8 and iid_hist.max() <= 32  # 20 of each class per client, within 3 sd


def test_shards_give_k_classes_per_client():
    parts = partition(LABELS, 5, "shards:2", seed=1)
    for p in parts:
        assert len(np.unique(LABELS[p])) == 2 and len(p) == 200


def test_even_extreme_skew_leaves_no_client_empty():
    labels = np.repeat(np.arange(3), 4)  # 12 samples, 3 classes
    for seed in range(20):
        assert all(len(p) > 0 for p in partition(labels, 6, "dirichlet:0.01", seed))


@pytest.mark.parametrize("bad", ["dirichlet", "dirichlet:0", "dirichlet:x", "shards:0", "random", "iid:2"])
def test_bad_schemes_list_the_valid_ones(bad):
    with pytest.raises(PartitionError, match="use one of: iid, dirichlet:ALPHA"):
        partition(LABELS, 3, bad, 0)
    with pytest.raises(PartitionError):
        partition(LABELS[:2], 3, "iid", 0)
