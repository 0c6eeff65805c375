"""Splitting a training set among simulated clients."""

from __future__ import annotations

import numpy as np
import pytest

import flora.sim.partition as partition_module
from flora.sim.partition import PartitionError, histogram_skew, label_histogram, label_skew, parse_scheme, partition

LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 10 balanced classes
SCHEMES = ["iid", "dirichlet:0.5", "dirichlet:0.05", "shards:1", "shards:2", "shards:3"]


def _assert_disjoint_cover(parts, n_samples, n_clients):
    assert len(parts) == n_clients and all(len(p) > 0 for p in parts)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n_samples))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("clients", [1, 7, 50])
def test_every_client_gets_samples_and_the_parts_cover_everything_once(scheme, clients):
    _assert_disjoint_cover(partition(LABELS, clients, scheme, seed=0), len(LABELS), clients)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.01", "shards:1", "shards:2"])
def test_as_many_clients_as_samples_and_extreme_skew_leave_no_client_empty(scheme):
    labels = np.repeat(np.arange(3), 4)  # 12 samples, 3 classes
    for seed in range(20):
        _assert_disjoint_cover(partition(labels, 6, scheme, seed), 12, 6)
        _assert_disjoint_cover(partition(labels, 12, scheme, seed), 12, 12)  # one sample each


@pytest.mark.parametrize("scheme", SCHEMES)
def test_seeded_and_deterministic(scheme):
    a = partition(LABELS, 5, scheme, seed=3)
    b = partition(LABELS, 5, scheme, seed=3)
    c = partition(LABELS, 5, scheme, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_parts_are_equal_sized_and_follow_the_global_distribution():
    labels = np.repeat(np.arange(10), 1000)  # 10 000 samples
    parts = partition(labels, 5, "iid", seed=0)
    assert sorted({len(p) for p in parts}) == [2000]
    hist = label_histogram(labels, parts, 10)
    assert hist.sum() == 10_000 and hist.min() >= 200 - 45 and hist.max() <= 200 + 45  # 200 expected, sd 13
    assert label_skew(labels, parts, 10) < 0.04
    assert sorted({len(p) for p in partition(LABELS, 7, "iid", seed=0)}) == [142, 143]


def test_dirichlet_skew_follows_alpha():
    """Mean over 5 seeds, 10 clients: measured 0.69 (alpha 0.1), 0.42 (0.5), 0.04 (100), 0.12 (iid: sampling noise)."""
    skew = {s: np.mean([label_skew(LABELS, partition(LABELS, 10, s, seed), 10) for seed in range(5)])
            for s in ("iid", "dirichlet:100", "dirichlet:0.5", "dirichlet:0.1")}
    assert skew["dirichlet:0.1"] > 0.6
    assert skew["dirichlet:0.1"] > skew["dirichlet:0.5"] + 0.15
    assert skew["dirichlet:100"] < 0.06 and skew["iid"] < 0.15
    assert skew["dirichlet:0.1"] > 10 * skew["dirichlet:100"]
    classes_per_client = [np.mean([len(np.unique(LABELS[p])) for p in partition(LABELS, 10, s, 0)])
                          for s in ("dirichlet:0.1", "dirichlet:100")]
    assert classes_per_client[0] < 6 and classes_per_client[1] == 10


@pytest.mark.parametrize(("clients", "k"), [(5, 2), (10, 2), (20, 1), (25, 2), (10, 10), (4, 5), (100, 2), (10, 4)])
def test_shards_give_exactly_k_classes_per_client_when_divisible(clients, k):
    """Divisible: clients * k is a multiple of the 10 classes and divides the 1000 samples: one class a shard."""
    for seed in range(3):
        parts = partition(LABELS, clients, f"shards:{k}", seed)
        assert [len(np.unique(LABELS[p])) for p in parts] == [k] * clients
        sizes = {len(p) for p in parts}
        assert max(sizes) - min(sizes) <= k  # equal shards, up to array_split's remainder
    assert label_skew(LABELS, partition(LABELS, 10, "shards:1", 0), 10) == pytest.approx(0.9)


def test_shards_fallback_deal_keeps_classes_apart(monkeypatch):
    monkeypatch.setattr(partition_module, "_DEAL_TRIES", 0)
    for clients, k in [(10, 2), (5, 2), (10, 5)]:
        parts = partition(LABELS, clients, f"shards:{k}", seed=0)
        assert [len(np.unique(LABELS[p])) for p in parts] == [k] * clients


def test_more_shard_classes_than_the_data_has_is_an_error():
    with pytest.raises(PartitionError, match=r"shards:11 asks for 11 classes per client but the data has 10"):
        partition(LABELS, 2, "shards:11", 0)


@pytest.mark.parametrize("bad", ["dirichlet", "dirichlet:0", "dirichlet:-1", "dirichlet:x", "dirichlet:nan",
                                 "dirichlet:inf", "shards:0", "shards:1.5", "shards", "random", "iid:2", ""])
def test_bad_schemes_name_themselves_and_list_the_valid_ones(bad):
    with pytest.raises(PartitionError, match=rf"unknown partition scheme '{bad}'; use one of: iid, dirichlet:ALPHA"):
        partition(LABELS, 3, bad, 0)


def test_scheme_parsing_and_other_errors():
    assert parse_scheme(" Dirichlet:0.5 ") == ("dirichlet", 0.5)
    assert parse_scheme("shards:2") == ("shards", 2.0) and parse_scheme("iid") == ("iid", 0.0)
    with pytest.raises(PartitionError, match="2 samples cannot give 3 clients one sample each"):
        partition(LABELS[:2], 3, "iid", 0)
    with pytest.raises(PartitionError, match="at least one client"):
        partition(LABELS, 0, "iid", 0)
    with pytest.raises(PartitionError, match="1-D"):
        partition(LABELS.reshape(10, 100), 2, "iid", 0)


def test_histogram_and_skew_numbers():
    labels = np.array([0, 0, 1, 1, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5])]
    hist = label_histogram(labels, parts, 4)
    np.testing.assert_array_equal(hist, [[2, 0, 0, 0], [0, 2, 2, 0]])
    # global mix (1/3, 1/3, 1/3): client 0 is at TV 2/3, client 1 at 1/3
    assert label_skew(labels, parts, 4) == pytest.approx(0.5)
    assert histogram_skew([[5, 5], [1, 1], [0, 0]]) == 0.0  # identical mixes; the empty row is skipped
    with pytest.raises(ValueError, match="empty"):
        histogram_skew([[0, 0]])
