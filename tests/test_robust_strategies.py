"""Robust strategies (norm bounding, coordinate-wise median, trimmed mean): their numbers against numpy and
scipy, what one attacker can do to each, and the bound on what the buffering ones hold."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from flora.broker.strategies import STRATEGIES, OptionError, StrategyFull, buffered, make_strategy, parse_assignments
from flora.edge.adapter import FlatTensors, decode, encode, layout_of
from flora.edge.synthetic import random_adapter, synthetic_manifest

M = synthetic_manifest(blocks=2, width=8, rank=2)


def _flat(tensors):
    lay = layout_of(M.trainable)
    return np.concatenate([np.ravel(tensors[name]) for name, *_ in lay.entries]).astype(np.float64)


def _run(name, updates, global_, samples=None, **options):
    s = make_strategy(name, options)
    s.begin_round(M.trainable, global_)
    for i, u in enumerate(updates):
        s.accumulate(u, samples[i] if samples else 10)
    return s, s.finalize()


def _updates(n, seed=0, scale=0.1):
    return [random_adapter(M, seed=seed + i, scale=scale) for i in range(n)]


@pytest.mark.parametrize("n", [1, 4, 7])
def test_median_is_numpys_median_of_the_updates_per_coordinate(n):
    g = random_adapter(M, seed=99)
    ups = _updates(n)
    s, out = _run("median", ups, g, samples=list(range(1, n + 1)))  # weights play no part
    want = np.median(np.stack([_flat(u) for u in ups]), axis=0)
    np.testing.assert_allclose(_flat(out), want, rtol=0, atol=1e-6)
    assert s.count == n and s.total_samples == n * (n + 1) // 2


@pytest.mark.parametrize(("n", "trim"), [(10, 0.1), (10, 0.25), (7, 0.2), (3, 0.1)])
def test_trimmed_mean_is_scipys_trim_mean(n, trim):
    g = random_adapter(M, seed=98)
    ups = _updates(n, seed=5)
    s, out = _run("trimmed-mean", ups, g, trim=trim)
    want = stats.trim_mean(np.stack([_flat(u) for u in ups]), trim, axis=0)
    np.testing.assert_allclose(_flat(out), want, rtol=0, atol=1e-6)
    assert s.round_info() == {"trimmed_per_side": int(trim * n)}


def test_trim_count_fixes_how_many_go_and_refuses_to_drop_everything():
    ups = _updates(5)
    g = random_adapter(M, seed=1)
    s, out = _run("trimmed-mean", ups, g, trim_count=2)
    np.testing.assert_allclose(_flat(out), np.median(np.stack([_flat(u) for u in ups]), axis=0), atol=1e-6)
    s = make_strategy("trimmed-mean", {"trim_count": "2"})
    s.begin_round(M.trainable, g)
    for u in ups[:4]:
        s.accumulate(u, 1)
    with pytest.raises(ValueError, match="drops every one of the round's 4 updates"):
        s.finalize()


def test_one_boosted_attacker_moves_fedavg_far_and_the_robust_strategies_not_at_all():
    g = random_adapter(M, seed=7, scale=0.05)
    honest = _updates(9, seed=20, scale=0.01)
    honest = [{k: g[k] + v for k, v in u.items()} for u in honest]  # small honest deltas around the global
    evil = {k: g[k] + 100.0 * (honest[0][k] - g[k]) * -1 for k in g}  # sign-flip x100
    lo = np.min(np.stack([_flat(u) for u in honest]), axis=0)
    hi = np.max(np.stack([_flat(u) for u in honest]), axis=0)
    _, avg = _run("fedavg", [*honest, evil], g)
    assert np.max(np.abs(_flat(avg) - _flat(g))) > 0.1  # dragged ten times further than any honest delta
    for name, opts in (("median", {}), ("trimmed-mean", {"trim": 0.1})):
        _, out = _run(name, [*honest, evil], g, **opts)
        f = _flat(out)
        assert np.all(f >= lo - 1e-6) and np.all(f <= hi + 1e-6), name  # inside the honest range everywhere
    _, bounded = _run("norm-bound", [*honest, evil], g, max_norm=0.05)
    honest_only = _run("norm-bound", honest, g, max_norm=0.05)[1]
    assert np.linalg.norm(_flat(bounded) - _flat(honest_only)) < 0.05 * 2 / 10 + 1e-6  # at most its share of M


def test_norm_bound_scales_big_deltas_to_the_bound_and_leaves_small_ones():
    g = random_adapter(M, seed=3)
    small = {k: g[k] + 1e-3 for k in g}
    big = {k: g[k] + 1.0 for k in g}
    s, out = _run("norm-bound", [small, big], g, samples=[1, 3], max_norm=0.5)
    d_small, d_big = _flat(small) - _flat(g), _flat(big) - _flat(g)
    want = _flat(g) + (1 * d_small + 3 * d_big * 0.5 / np.linalg.norm(d_big)) / 4
    np.testing.assert_allclose(_flat(out), want, atol=1e-6)
    assert s.round_info() == {"clipped": 1}
    _, uniform = _run("norm-bound", [small, big], g, samples=[1, 3], max_norm=0.5, weighting="uniform")
    np.testing.assert_allclose(_flat(uniform), _flat(g) + (d_small + d_big * 0.5 / np.linalg.norm(d_big)) / 2,
                               atol=1e-6)
    _, fedavg = _run("fedavg", [small, small], g)
    np.testing.assert_allclose(_flat(_run("norm-bound", [small, small], g, max_norm=0.5)[1]), _flat(fedavg),
                               atol=1e-7)  # nothing clipped: FedAvg exactly


def test_norm_bound_copes_with_a_delta_whose_square_overflows():
    g = {k: np.zeros_like(v) for k, v in random_adapter(M, seed=0).items()}
    huge = {k: np.full_like(v, 3e38) for k, v in g.items()}  # finite float32, its squared norm is not
    _, out = _run("norm-bound", [huge], g, max_norm=2.0)
    assert np.isclose(np.linalg.norm(_flat(out)), 2.0, rtol=1e-6)


def test_the_buffer_refuses_one_update_beyond_its_bound_and_keeps_the_round():
    g = random_adapter(M, seed=0)
    s = make_strategy("median", {"max_updates": "3"})
    s.begin_round(M.trainable, g)
    ups = _updates(4)
    for u in ups[:3]:
        s.accumulate(u, 1)
    with pytest.raises(StrategyFull, match=r"holds at most 3 updates a round \(max_updates=3"):
        s.accumulate(ups[3], 1)
    assert s.count == 3
    np.testing.assert_allclose(_flat(s.finalize()), np.median(np.stack([_flat(u) for u in ups[:3]]), axis=0),
                               atol=1e-6)


def test_the_memory_bound_sets_the_update_bound_and_holds():
    numel = layout_of(M.trainable).numel
    mb = 10.5 * numel * 4 / (1 << 20)  # room for ten and a half float32 rows
    s = make_strategy("trimmed-mean", {"max_memory_mb": mb})
    s.begin_round(M.trainable, random_adapter(M, seed=0))
    assert s.max_updates == 10
    for u in _updates(10):
        s.accumulate(u, 1)
    assert s.memory_bytes <= mb * (1 << 20)
    with pytest.raises(StrategyFull):
        s.accumulate(random_adapter(M, seed=50), 1)
    half = make_strategy("trimmed-mean", {"max_memory_mb": mb, "storage": "float16"})
    half.begin_round(M.trainable, random_adapter(M, seed=0))
    assert half.max_updates == 21  # float16 rows: twice as many fit


def test_float16_storage_is_close_and_saturates_instead_of_overflowing():
    g = random_adapter(M, seed=2)
    ups = _updates(5, seed=30)
    _, exact = _run("median", ups, g)
    _, half = _run("median", ups, g, storage="float16")
    d = _flat(exact) - _flat(g)
    assert np.max(np.abs(_flat(half) - _flat(exact))) <= 1e-3 * np.max(np.abs(d)) + 1e-7
    huge = {k: np.full_like(v, 1e6) for k, v in g.items()}  # a delta of 1e6 is inf in float16
    _, out = _run("median", [*ups[:2], huge], g, storage="float16")
    assert np.isfinite(_flat(out)).all()
    np.testing.assert_allclose(_flat(out), np.median(np.stack([_flat(u) for u in [*ups[:2], huge]]), axis=0),
                               atol=1e-3)


def test_finalize_in_small_chunks_gives_the_same_result(monkeypatch):
    g = random_adapter(M, seed=4)
    ups = _updates(6, seed=40)
    _, whole = _run("trimmed-mean", ups, g, trim=0.2)
    monkeypatch.setattr(buffered, "CHUNK_BYTES", 8)  # one coordinate block of the minimum size at a time
    _, chunked = _run("trimmed-mean", ups, g, trim=0.2)
    np.testing.assert_array_equal(_flat(whole), _flat(chunked))


def test_flat_blobs_and_tensor_dicts_give_the_same_deltas():
    g = random_adapter(M, seed=5)
    ups = _updates(3, seed=60)
    blobs = [decode(encode(u, model_id=M.model_id, round=0, kind="update", client_id=f"c{i}", num_samples=1),
                    M.trainable, copy=False).tensors for i, u in enumerate(ups)]
    assert all(isinstance(b, FlatTensors) for b in blobs)
    for name in ("median", "trimmed-mean", "norm-bound"):
        opts = {"max_norm": 0.3} if name == "norm-bound" else {}
        np.testing.assert_array_equal(_flat(_run(name, blobs, g, **opts)[1]), _flat(_run(name, ups, g, **opts)[1]))


def test_the_strategies_say_what_they_need():
    assert STRATEGIES["median"].needs_all_updates and STRATEGIES["trimmed-mean"].needs_all_updates
    assert not STRATEGIES["norm-bound"].needs_all_updates and not STRATEGIES["fedavg"].needs_all_updates
    for name in ("median", "trimmed-mean", "norm-bound"):
        assert make_strategy(name, {"max_norm": 1} if name == "norm-bound" else {}).needs_individual_updates
    assert not make_strategy("fedavg").needs_individual_updates


def test_options_are_checked_against_what_each_strategy_declares():
    assert parse_assignments(["trim=0.2", "max-updates = 5"]) == {"trim": "0.2", "max_updates": "5"}
    for bad in (["trim"], ["=3"], ["a=1", "a=2"]):
        with pytest.raises(OptionError):
            parse_assignments(bad)
    with pytest.raises(OptionError, match="'median' has no option 'trim'; its options: max_memory_mb"):
        make_strategy("median", {"trim": "0.1"})
    with pytest.raises(OptionError, match=r"trim='0.5': must be in \[0, 0.5\)"):
        make_strategy("trimmed-mean", {"trim": "0.5"})
    with pytest.raises(OptionError, match="max_updates='0'"):
        make_strategy("median", {"max_updates": "0"})
    with pytest.raises(ValueError, match="needs max_norm"):
        make_strategy("norm-bound")
    assert make_strategy("trimmed-mean", {"trim": 0.3, "storage": "float16"}).describe()["trim"] == 0.3


def test_a_delta_strategy_needs_the_rounds_global():
    s = make_strategy("median")
    with pytest.raises(ValueError, match="lacks tensor"):
        s.begin_round(M.trainable, {})


def test_the_aggregator_rejects_beyond_the_bound_as_strategy_full_and_records_the_strategys_facts(tmp_path):
    from flora.broker.rounds import Sampling
    from flora.edge.synthetic import encode_update

    from .fakes import FakeClock, offline_aggregator, status

    clock = FakeClock()
    agg = offline_aggregator(tmp_path, clock, manifest=M, rounds=1, round_timeout_s=30, strategy="trimmed-mean",
                             strategy_options={"max_updates": "2", "trim": "0.3"}, sampling=Sampling(min_clients=2))
    agg._resume_or_start()
    for c in ("a", "b", "c"):
        agg.handle("status", c, status(c))
    agg._open_round()
    for i, c in enumerate(("a", "b", "c")):
        agg.handle("update", c, encode_update(M, random_adapter(M, seed=i), c, 0, 5))
    rec = agg.current
    assert sorted(rec.reported) == ["a", "b"] and rec.rejection_counts == {"strategy-full": 1}
    assert "holds at most 2 updates" in rec.rejected[0]["detail"]
    agg._tick()  # every asked client sent its update (c's was refused): the metrics grace starts
    clock.t += 2
    agg._tick()
    row = agg.checkpoint.history()[-1]
    assert row["strategy"] == "trimmed-mean" and row["trimmed_per_side"] == 0 and row["rejection_counts"] == {
        "strategy-full": 1}
