"""DP-FedAvg: the device's clip (edge.dp), the server's clip, sum, Gaussian noise and divisor (dp-fedavg),
and the distributed mode's noise shares."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flora.broker.strategies import make_strategy
from flora.edge import dp
from flora.edge.adapter import layout_of
from flora.edge.synthetic import random_adapter, synthetic_manifest

M = synthetic_manifest(blocks=2, width=16, rank=4)


def _flat(tensors):
    return np.concatenate([np.ravel(tensors[name]) for name, *_ in layout_of(M.trainable).entries]).astype(np.float64)


def test_delta_norm_is_the_l2_norm_over_all_tensors_together():
    g, u = random_adapter(M, 0), random_adapter(M, 1)
    assert math.isclose(dp.delta_norm(u, g), float(np.linalg.norm(_flat(u) - _flat(g))), rel_tol=1e-12)
    assert dp.delta_norm(g, g) == 0.0


def test_clip_scales_the_delta_to_the_bound_and_keeps_its_direction():
    g, u = random_adapter(M, 0), random_adapter(M, 1)
    norm = dp.delta_norm(u, g)
    c = dp.clip_update(u, g, norm / 4)
    assert c.was_clipped and math.isclose(c.scale, 0.25) and math.isclose(c.norm, norm)
    d_in, d_out = _flat(u) - _flat(g), _flat(c.tensors) - _flat(g)
    assert math.isclose(np.linalg.norm(d_out), norm / 4, rel_tol=1e-6)
    assert np.dot(d_in, d_out) / (np.linalg.norm(d_in) * np.linalg.norm(d_out)) > 1 - 1e-6
    same = dp.clip_update(u, g, norm * 2)
    assert not same.was_clipped
    np.testing.assert_array_equal(_flat(same.tensors), _flat(u).astype(np.float32))


def test_clip_refuses_what_it_cannot_bound():
    g = random_adapter(M, 0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="clip norm"):
            dp.clip_update(g, g, bad)
    with pytest.raises(ValueError, match="different tensors"):
        dp.clip_update({k: v for k, v in list(g.items())[1:]}, g, 1.0)


def test_noise_shares_of_n_clients_sum_to_noise_of_std_z_times_c():
    rng = dp.noise_rng(seed=1)
    std = dp.noise_share_std(2.0, 0.5, 16)
    assert math.isclose(std, 2.0 * 0.5 / 4)
    total = sum(rng.normal(0.0, std, 200_000) for _ in range(16))
    assert abs(total.std() - 1.0) < 0.01  # z*C = 1


def test_the_default_noise_source_is_unpredictable_and_a_seed_reproduces():
    a, b = dp.noise_rng(), dp.noise_rng()
    assert not np.array_equal(a.normal(size=8), b.normal(size=8))
    np.testing.assert_array_equal(dp.noise_rng(5).normal(size=8), dp.noise_rng(5).normal(size=8))


def _dp_round(updates, g, asked=None, **options):
    s = make_strategy("dp-fedavg", {"noise_seed": 0, **options})
    s.begin_round(M.trainable, g)
    if asked is not None:
        s.set_round_size(asked)
    for u in updates:
        s.accumulate(u, 1000)  # sample counts give no extra weight
    return s, s.finalize()


def test_without_noise_it_is_the_mean_of_the_clipped_deltas_over_the_clients_asked():
    g = random_adapter(M, 0)
    ups = [random_adapter(M, i) for i in range(1, 4)]
    clip = 0.5 * min(dp.delta_norm(u, g) for u in ups)
    s, out = _dp_round(ups, g, asked=5, clip=clip, noise_multiplier=0)
    want = _flat(g) + sum(_flat(dp.clip_update(u, g, clip).tensors) - _flat(g) for u in ups) / 5
    np.testing.assert_allclose(_flat(out), want, atol=1e-6)
    info = s.round_info()["dp"]
    assert info["clipped"] == 3 and info["divisor"] == 5 and info["noise_std_of_mean"] == 0


def test_the_server_clips_what_a_device_did_not():
    g = random_adapter(M, 0)
    unclipped = {k: v + 10.0 for k, v in g.items()}
    _, out = _dp_round([unclipped], g, asked=1, clip=0.1, noise_multiplier=0)
    assert math.isclose(dp.delta_norm(out, g), 0.1, rel_tol=1e-5)


def test_the_noise_on_the_sum_has_std_z_times_c():
    big = synthetic_manifest(blocks=8, width=64, rank=8)  # 65,536 coordinates
    g = {k: np.zeros_like(v) for k, v in random_adapter(big, 0).items()}
    s = make_strategy("dp-fedavg", {"clip": 0.5, "noise_multiplier": 1.5, "noise_seed": 3})
    s.begin_round(big.trainable, g)
    s.set_round_size(4)
    for _ in range(4):
        s.accumulate(g, 1)  # zero deltas: the result is noise / 4 alone
    out = np.concatenate([v.ravel() for v in s.finalize().values()]).astype(np.float64)
    assert abs(out.std() * 4 / (1.5 * 0.5) - 1) < 0.01 and abs(out.mean()) < 0.01
    assert math.isclose(s.round_info()["dp"]["noise_std_of_mean"], 1.5 * 0.5 / 4)


def test_distributed_mode_adds_no_server_noise_and_charges_the_missing_shares():
    g = random_adapter(M, 0)
    ups = [random_adapter(M, i) for i in range(1, 4)]
    s, out = _dp_round(ups, g, asked=4, clip=0.01, noise_multiplier=2.0, mode="distributed")
    # the mean over the 3 shares that came (no server clip, no server noise), charged z * sqrt(3/4)
    np.testing.assert_allclose(_flat(out), _flat(g) + sum(_flat(u) - _flat(g) for u in ups) / 3, atol=1e-6)
    assert not s.needs_individual_updates and make_strategy("dp-fedavg", {"clip": 1}).needs_individual_updates
    assert math.isclose(s.effective_noise_multiplier, 2.0 * math.sqrt(3 / 4))


def test_a_round_that_was_never_sized_divides_by_the_updates_it_got():
    g = random_adapter(M, 0)
    ups = [random_adapter(M, i) for i in range(1, 3)]
    _, out = _dp_round(ups, g, clip=100.0, noise_multiplier=0)
    np.testing.assert_allclose(_flat(out), (_flat(ups[0]) + _flat(ups[1])) / 2, atol=1e-6)


def test_dp_options_are_checked():
    with pytest.raises(ValueError, match="needs a clip norm"):
        make_strategy("dp-fedavg")
    with pytest.raises(ValueError, match="noise_multiplier='-1'"):
        make_strategy("dp-fedavg", {"clip": "1", "noise_multiplier": "-1"})
    with pytest.raises(ValueError, match="mode='local'"):
        make_strategy("dp-fedavg", {"clip": "1", "mode": "local"})
    s = make_strategy("dp-fedavg", {"clip": "1"})
    with pytest.raises(ValueError, match="positive integer"):
        s.begin_round(M.trainable, random_adapter(M, 0)) or s.accumulate(random_adapter(M, 0), 0)


def test_integer_noise_shares_are_rounded_gaussians_within_the_declared_bound():
    unit = 2.0 ** -16
    std = dp.noise_share_std(1.0, 0.1, 25)  # 0.02: 1311 units
    bound = dp.integer_noise_bound(std, unit)
    assert bound == math.ceil(12 * std / unit)
    rng = dp.noise_rng(seed=2)
    shares = [dp.integer_noise(50_000, std, unit, bound, rng) for _ in range(25)]
    assert all(s.dtype == np.int64 and np.abs(s).max() <= bound for s in shares)
    total = np.sum(shares, axis=0) * unit  # what secure aggregation's sum carries, back in update units
    assert abs(total.std() / (1.0 * 0.1) - 1) < 0.01  # z*C
    with pytest.raises(ValueError, match="needs a noise bound of at least"):
        dp.integer_noise(10, std, unit, bound - 1, rng)
