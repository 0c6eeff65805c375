"""broker.influence (one client's bound on a round) and broker.ratelimit (per-client token buckets): pure."""

from __future__ import annotations

import pytest

from flora.broker.influence import (
    NORM_OUTLIER,
    InfluencePolicy,
    RoundInfluence,
    capped_weights,
    changed,
    decide,
)
from flora.broker.ratelimit import Rate, RateLimiter

from .fakes import FakeClock


def test_capped_weights_water_fill_to_the_share():
    assert capped_weights({"a": 10, "b": 10, "c": 10}, 0.5) == {"a": 10.0, "b": 10.0, "c": 10.0}  # already under
    got = capped_weights({"evil": 10 ** 9, "a": 10, "b": 30}, 0.5)
    assert got == {"evil": 40.0, "a": 10.0, "b": 30.0}  # evil at exactly half of 80
    got = capped_weights({"x": 100, "y": 90, "a": 1, "b": 1}, 0.3)
    total = sum(got.values())
    assert max(got.values()) <= 0.3 * total + 1e-9 and got["a"] == got["b"] == 1.0 and got["x"] == got["y"]
    assert capped_weights({"only": 10 ** 9}, 0.5) == {"only": 10 ** 9}  # the only one keeps its weight
    assert capped_weights({"a": 5, "b": 1}, 0.5) == {"a": 1.0, "b": 1.0}  # two clients: equal at most
    assert capped_weights({"a": 5, "b": 1, "c": 1}, 0.2) == {"a": 1.0, "b": 1.0, "c": 1.0}  # 0.2 * 3 < 1
    assert capped_weights({"a": 7, "b": 3}, 1.0) == {"a": 7, "b": 3}  # no cap


def test_norm_bound_is_leave_one_out_so_two_clients_check_each_other():
    policy = InfluencePolicy(max_share=1.0, norm_factor=10)
    rnd = RoundInfluence()
    rnd.add("honest", 10, 0.8)
    rnd.add("evil", 10, 1e30)
    got = decide(policy, rnd)
    assert got["evil"].refused == NORM_OUTLIER and "over 10 x the median 0.8" in got["evil"].detail
    assert got["honest"].refused is None and got["honest"].weight == 10 and got["honest"].scale == 1.0
    clip = decide(InfluencePolicy(max_share=1.0, norm_factor=10, norm_action="clip"), rnd)
    assert clip["evil"].refused is None and clip["evil"].scale == pytest.approx(8.0 / 1e30)
    alone = RoundInfluence()
    alone.add("evil", 10, 1e3)
    assert decide(policy, alone)["evil"].refused is None  # no reference at all: nothing to compare with
    assert decide(policy, alone, earlier_medians=[0.5, 0.7])["evil"].refused == NORM_OUTLIER
    calm = _round({"a": (5, 1.0), "b": (6, 1.2), "c": (7, 0.9)})
    assert not changed(decide(policy, calm), calm.weights)  # nothing to change: no re-fold


def _round(items):
    rnd = RoundInfluence()
    for client, (weight, norm) in items.items():
        rnd.add(client, weight, norm)
    return rnd


def test_poisoning_with_a_huge_weight_and_huge_values_is_bounded_both_ways():
    policy = InfluencePolicy()  # defaults: 50 % share, 10 x the median
    rnd = _round({"a": (100, 0.5), "b": (120, 0.6), "c": (90, 0.55), "evil": (10 ** 9, 3.0)})
    got = decide(policy, rnd)
    assert got["evil"].refused is None  # within 10 x: kept, but capped at half the round's weight
    kept = {c: d.weight for c, d in got.items()}
    assert kept["evil"] == pytest.approx(0.5 * sum(kept.values())) and changed(got, rnd.weights)


def test_declared_num_samples():
    p = InfluencePolicy()
    assert p.over_declared(10, 10) is None and p.over_declared(10, None) is None
    assert "above the 10 the device declared" in p.over_declared(10 ** 9, 10)
    assert InfluencePolicy(check_declared=False).over_declared(10 ** 9, 10) is None
    for bad in (dict(max_share=0), dict(max_share=1.5), dict(norm_factor=0.5), dict(norm_action="drop")):
        with pytest.raises(ValueError):
            InfluencePolicy(**bad)


def test_rate_limiter_refills_bounds_and_forgets():
    clock = FakeClock(0.0)
    lim = RateLimiter(Rate(2.0, 3.0), clock, max_clients=2)
    assert [lim.allow("a") for _ in range(4)] == [True, True, True, False]  # the burst, then nothing
    clock.t += 0.5
    assert lim.allow("a") and not lim.allow("a")  # 0.5 s at 2/s: one more
    assert all(lim.allow("b") for _ in range(3))  # clients are independent
    lim.allow("c")  # a third client: the longest idle (a) is forgotten
    assert lim.tokens("a") is None and lim.allow("a")
    assert Rate.parse("5/s") == Rate(5.0, 25.0) and Rate.parse("0.5/s,burst=2") == Rate(0.5, 2.0)
    assert Rate.parse("off").unlimited and RateLimiter(Rate.parse("off"), clock).allow("z")
    for bad in ("5", "fast", "-1/s", "1/s,burst=0"):
        with pytest.raises(ValueError):
            Rate.parse(bad)
