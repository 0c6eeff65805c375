"""Product-space averaging with SVD truncation, FedAvg's product error, and server optimizers whose state
survives a restart exactly."""

from __future__ import annotations

import numpy as np
import pytest

from flora.broker.checkpoint import CheckpointError
from flora.broker.strategies import FedAdam, FedAvg, FedAvgM, FedYogi, ProductSVD, make_strategy
from flora.broker.strategies.lowrank import ProductSums, lora_pairs
from flora.edge.synthetic import random_adapter, synthetic_manifest

from .fakes import one_round, started_aggregator

M = synthetic_manifest(blocks=2, width=16, rank=4)
PAIRS = lora_pairs(M.trainable)


def fold(strategy, updates, weights, current=None):
    strategy.begin_round(M.trainable, current or random_adapter(M, 99))
    for u, w in zip(updates, weights):
        strategy.accumulate(u, w)
    return strategy.finalize()


def products(tensors):
    return {t: tensors[b].astype(np.float64) @ tensors[a].astype(np.float64) for t, a, b in PAIRS}


def exact_mean(updates, weights):
    per = [products(u) for u in updates]
    return {t: sum(w * p[t] for w, p in zip(weights, per)) / sum(weights) for t, _, _ in PAIRS}


def rel(a, b):
    return np.sqrt(sum(np.sum((a[t] - b[t]) ** 2) for t in b) / sum(np.sum(b[t] ** 2) for t in b))


def test_product_averaging_is_the_best_rank_r_approximation_of_the_exact_mean():
    updates = [random_adapter(M, s) for s in (1, 2, 3)]
    weights = [10, 30, 60]
    strategy = ProductSVD()
    out = fold(strategy, updates, weights)
    exact = exact_mean(updates, weights)
    got = products(out)
    for t, _, _ in PAIRS:
        u, s, vt = np.linalg.svd(exact[t])
        best = (u[:, :4] * s[:4]) @ vt[:4]
        np.testing.assert_allclose(got[t], best, atol=1e-5)
    diag = strategy.round_info()
    avg = fold(FedAvg(), updates, weights)
    assert diag["separate_vs_exact_rel_error"] == pytest.approx(rel(products(avg), exact), rel=1e-6)
    assert 0 < diag["svd_truncation_rel_error"] < diag["separate_vs_exact_rel_error"]  # SVD beats FedAvg here
    single = ProductSVD()
    out1 = fold(single, updates[:1], [7])  # one client: its own product back exactly, nothing truncated
    for t, _, _ in PAIRS:
        np.testing.assert_allclose(products(out1)[t], products(updates[0])[t], atol=1e-6)
    assert single.round_info()["svd_truncation_rel_error"] == pytest.approx(0.0, abs=1e-6)
    assert single.round_info()["separate_vs_exact_rel_error"] == pytest.approx(0.0, abs=1e-6)


def test_product_memory_is_flat_in_the_number_of_updates():
    sums = ProductSums(M.trainable)
    before = sums.nbytes
    for s in range(50):
        sums.add(random_adapter(M, s), 1.0)
    assert sums.nbytes == before == 8 * sum(16 * 16 for _ in PAIRS)


def test_fedavg_can_report_its_product_error_and_refuses_unknown_options():
    updates = [random_adapter(M, s) for s in (4, 5)]
    plain, measured = FedAvg(), FedAvg(product_error=True)
    out = fold(measured, updates, [1, 3])
    assert all(np.array_equal(out[k], v) for k, v in fold(plain, updates, [1, 3]).items())  # same average
    assert plain.round_info() == {}
    assert measured.round_info()["separate_vs_exact_rel_error"] == pytest.approx(
        rel(products(out), exact_mean(updates, [1, 3])), rel=1e-6)
    with pytest.raises(ValueError, match="has no option 'server_lr'"):
        make_strategy("fedavg", {"server_lr": "0.1"})
    adam = make_strategy("fedadam", {"server_lr": "0.05", "tau": "1e-4"})
    assert (adam.server_lr, adam.tau, adam.beta2) == (0.05, 1e-4, 0.99)
    assert make_strategy("fedavg", {"product_error": "true"}).product_error


def test_server_optimizers_step_on_the_averaged_delta():
    current = random_adapter(M, 0)
    updates = [random_adapter(M, s) for s in (1, 2)]
    mean = fold(FedAvg(), updates, [1, 1])
    delta = {k: mean[k].astype(np.float64) - current[k] for k in mean}
    plain_m = FedAvgM(server_lr=1.0, momentum=0.0)  # = FedAvg
    for k, v in fold(plain_m, updates, [1, 1], current).items():
        np.testing.assert_allclose(v, mean[k], atol=1e-6)
    adam = FedAdam(server_lr=0.01)
    out = fold(adam, updates, [1, 1], current)
    k = M.trainable[0].name
    m, v = 0.1 * delta[k], 0.99 * 1e-6 + 0.01 * delta[k] ** 2
    np.testing.assert_allclose(out[k], current[k] + 0.01 * m / (np.sqrt(v) + 1e-3), rtol=1e-5)
    assert adam.steps == 0 and np.all(adam.state_dict()[f"m.{k}"] == 0)  # proposed, not yet committed
    adam.commit()
    np.testing.assert_allclose(adam.state_dict()[f"m.{k}"], m)
    yogi = FedYogi(server_lr=0.01)
    fold(yogi, updates, [1, 1], current)
    yogi.commit()
    v0 = 1e-6
    np.testing.assert_allclose(yogi.state_dict()[f"v.{k}"], v0 - 0.01 * delta[k] ** 2 * np.sign(v0 - delta[k] ** 2))
    with pytest.raises(ValueError):
        FedAdam(server_lr=0.0)


def run(state_dir, rounds, strategy, start=0, stop=None, **kw):
    agg = started_aggregator(state_dir, rounds, manifest=M, strategy=strategy, **kw)
    for r in range(start, stop if stop is not None else rounds):
        one_round(agg, [random_adapter(M, 10 * r + 1), random_adapter(M, 10 * r + 2)], [3, 5])
    return agg


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedavgm"])
def test_a_restarted_aggregator_resumes_the_server_optimizer_exactly(tmp_path, strategy):
    straight = run(tmp_path / "straight", 4, strategy)
    first = run(tmp_path / "restarted", 4, strategy, stop=2)
    assert first.state.strategy_file and first.state.round == 2
    resumed = run(tmp_path / "restarted", 4, strategy, start=2)  # a new process on the same state dir
    assert resumed.strategy.steps == 4 == straight.strategy.steps
    for k, v in straight.global_tensors.items():
        np.testing.assert_array_equal(resumed.global_tensors[k], v)
    saved = straight.strategy.state_dict()
    assert all(np.array_equal(resumed.strategy.state_dict()[k], saved[k]) for k in saved)
    assert len(list((tmp_path / "restarted").glob("strategy-*.safetensors"))) == 1  # the old ones are removed
    with pytest.raises(CheckpointError, match="was run with --strategy"):
        started_aggregator(tmp_path / "restarted", 6, manifest=M, strategy="fedavg")


def test_product_strategy_rows_carry_both_errors(tmp_path):
    agg = run(tmp_path, 2, "flexlora")
    rows = agg.checkpoint.history()
    assert all(r["strategy"] == "flexlora" and r["separate_vs_exact_rel_error"] > 0 for r in rows)
    assert all(0 <= r["svd_truncation_rel_error"] < 1 for r in rows)
    assert not agg.state.strategy_file  # stateless: nothing beside the global
