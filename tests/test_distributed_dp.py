"""Distributed DP under secure aggregation, in one process (the real clients' and aggregator's secure-aggregation
state machines, the DP-FedAvg strategy and the accountant): every device clips its delta to C, encodes it with
weight 1 and adds an integer noise share of std z*C/sqrt(n) before masking; with m of n surviving, the
unmasked sum is the clipped deltas' sum plus noise of std z*C*sqrt(m/n), the strategy divides it by m and adds
no noise of its own, and the accountant charges the noise actually present."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.secagg_sim import make_federation, run_attempt
from flora.broker import accountant as A
from flora.broker.privacy import DPPolicy
from flora.broker.secure_aggregator import dp_encoding
from flora.edge import dp
from flora.edge.adapter import FlatTensors, layout_of
from flora.edge.secagg.encoding import Encoding, decode_sum
from flora.edge.secagg.messages import MASKED
from flora.edge.secagg.params import SecAggParams
from flora.edge.synthetic import random_adapter, synthetic_manifest

M = synthetic_manifest(blocks=4, width=64, rank=8)  # 16,384 LoRA floats: the noise's std to about 0.6 %
LAYOUT = layout_of(tuple(M.trainable))
N, K, T = 8, 6, 4
CLIP, Z = 0.5, 1.0


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return make_federation(tmp_path_factory.mktemp("pki"), N, federation="feddp")


def _secure_dp_round(fed, dropped, seed):
    """One secure attempt of a distributed-DP round of N devices, `dropped` leaving before their masked input:
    (the strategy's new global minus the old, flat; the exact sum of the survivors' clipped deltas; the
    strategy; the policy; the survivors)."""
    policy = DPPolicy(A.DPSettings(clip=CLIP, noise_multiplier=Z, mode="distributed"))
    share = policy.noise_share(N)
    enc = dp_encoding(Encoding(clip=CLIP, frac_bits=16, max_weight=1 << 16), share)
    params = SecAggParams.sized(N, K, T, enc)
    rng = np.random.default_rng(seed)
    g = random_adapter(M, seed)
    flat_g = np.concatenate([np.ravel(g[name]).astype(np.float64) for name, _, _, _ in LAYOUT.entries])
    clipped, noises, weights = {}, {}, {}
    for c in fed.clients:  # deltas of L2 norm 1-3: every one is clipped to C
        raw = rng.standard_normal(LAYOUT.numel)
        raw *= rng.uniform(1.0, 3.0) / np.linalg.norm(raw)
        clipped[c] = raw * dp.clip_factor(float(np.linalg.norm(raw)), CLIP)
        noises[c] = dp.integer_noise(LAYOUT.numel, share, enc.unit, enc.noise_bound, rng)
        weights[c] = int(rng.integers(2, 5000))  # sample counts: the encoding caps every weight at 1
    outcome, _server, traffic = run_attempt(fed, params, clipped, weights, drops={c: MASKED for c in dropped},
                                            noises=noises, round_number=seed)
    assert outcome.status == "done", outcome.reason
    assert set(outcome.survivors) == set(fed.clients) - set(dropped) and not traffic.rejections
    wsum, weight = decode_sum(outcome.total, enc)
    assert weight == len(outcome.survivors)  # weight 1 each: DP-FedAvg is unweighted
    strategy = policy.strategy("fedavg")
    strategy.begin_round(M.trainable, g)
    strategy.set_round_size(N)
    strategy.accumulate_partial(FlatTensors(flat_g * weight + wsum, LAYOUT), weight)
    out = strategy.finalize()
    step = np.concatenate([np.ravel(out[name]).astype(np.float64) for name, _, _, _ in LAYOUT.entries]) - flat_g
    exact = sum(clipped[c] for c in outcome.survivors)
    return step, exact, strategy, policy, outcome.survivors


@pytest.mark.parametrize("dropped", [(), (1, 5)])
def test_the_secure_sum_is_the_clipped_sum_plus_noise_of_std_zc_sqrt_m_over_n(fed, dropped):
    gone = [fed.clients[i] for i in dropped]
    step, exact, strategy, policy, survivors = _secure_dp_round(fed, gone, seed=len(gone) + 3)
    m = len(survivors)
    assert m == N - len(dropped)
    noise = step * m - exact  # the released sum minus the survivors' clipped deltas: the noise shares alone
    expected = Z * CLIP * math.sqrt(m / N)
    assert abs(float(np.mean(noise))) < 4 * expected / math.sqrt(noise.size)
    assert float(np.std(noise)) == pytest.approx(expected, rel=0.04)  # 7 standard errors; sqrt(6/8) is 13 % off
    assert strategy.round_info()["dp"]["divisor"] == m and strategy.round_info()["dp"]["shares"] == m
    assert strategy.effective_noise_multiplier == pytest.approx(Z * math.sqrt(m / N))
    row = policy.charge(N, 100, strategy, survivors)
    assert row["effective_noise_multiplier"] == pytest.approx(Z * math.sqrt(m / N))
    full = DPPolicy(A.DPSettings(clip=CLIP, noise_multiplier=Z, mode="distributed")).ledger.charge(N, 100, Z, survivors)
    assert (row["epsilon"] > full["epsilon"]) == (m < N)  # missing shares cost privacy; all present: as central


def test_the_strategy_adds_no_noise_and_no_clip_of_its_own_in_distributed_mode(fed):
    g = random_adapter(M, 1)
    flat_g = np.concatenate([np.ravel(g[name]).astype(np.float64) for name, _, _, _ in LAYOUT.entries])
    summed = np.random.default_rng(0).standard_normal(LAYOUT.numel) * 5.0  # far beyond 3 * C: never re-clipped
    outs = []
    for seed in (1, 2):  # two noise seeds: a strategy that drew noise would differ between them
        s = DPPolicy(A.DPSettings(clip=CLIP, noise_multiplier=Z, mode="distributed")).strategy(
            "fedavg", {"noise_seed": seed})
        s.begin_round(M.trainable, g)
        s.set_round_size(N)
        s.accumulate_partial(FlatTensors(flat_g * 3 + summed, LAYOUT), 3)
        outs.append(np.concatenate([np.ravel(v) for v in s.finalize().values()]))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], (flat_g + summed / 3).astype(np.float32), rtol=0, atol=1e-6)
    central = DPPolicy(A.DPSettings(clip=CLIP, noise_multiplier=Z)).strategy("fedavg")
    central.begin_round(M.trainable, g)
    with pytest.raises(ValueError, match="cannot fold a sum"):
        central.accumulate_partial(FlatTensors(flat_g, LAYOUT), 1)


def test_a_dp_encoding_holds_the_noise_share_and_caps_every_weight_at_one():
    share = DPPolicy(A.DPSettings(clip=CLIP, noise_multiplier=Z, mode="distributed")).noise_share(N)
    assert share == pytest.approx(Z * CLIP / math.sqrt(N))
    enc = dp_encoding(Encoding(clip=CLIP, frac_bits=16), share)
    assert enc.max_weight == 1 and enc.noise_bound == dp.integer_noise_bound(share, enc.unit)
    assert enc.noise_bound * enc.unit >= 12 * share  # 12 sigma of room
    assert SecAggParams.sized(N, K, T, enc).bits in (32, 64)  # the ring still holds N encodings with their noise
    assert DPPolicy(A.DPSettings(clip=CLIP, noise_multiplier=Z)).noise_share(N) is None  # central: no shares
    zero = dp_encoding(Encoding(clip=CLIP, frac_bits=16), 0.0)  # z = 0 (clip only): still unweighted
    assert zero.max_weight == 1 and zero.noise_bound == 1
