"""Differential privacy in the aggregator: devices told to clip, DP-FedAvg's aggregate, epsilon in every history
row, the stop-at-budget rule, restarts that go on counting, and the combinations refused."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flora.broker import accountant as A
from flora.broker.privacy import DPPolicy
from flora.broker.report import epsilon_of, history_table, privacy_summary
from flora.broker.rounds import Sampling
from flora.edge import dp
from flora.edge.errors import ConfigError
from flora.edge.protocol import TrainConfig
from flora.edge.synthetic import encode_update, random_adapter, synthetic_manifest

from .fakes import FakeClock, offline_aggregator, status

M = synthetic_manifest(blocks=1, width=8, rank=2)
CLIENTS = ("a", "b", "c", "d")


def _aggregator(tmp_path, clock, settings, **kw):
    kw.setdefault("sampling", Sampling(clients_per_round=2, min_clients=2, seed=1))
    agg = offline_aggregator(tmp_path, clock, manifest=M, rounds=kw.pop("rounds", 10), round_timeout_s=30, dp=settings,
                             **kw)
    agg._resume_or_start()
    for c in CLIENTS:
        agg.handle("status", c, status(c))
    return agg


def _run_round(agg, clock, seed=0):
    """Open a round, every asked client sends a big update (far outside the clip), close it; the row."""
    agg._open_round()
    if agg.current is None:
        return None
    rec = agg.current
    for i, c in enumerate(sorted(rec.asked)):
        big = {k: v + 5.0 for k, v in random_adapter(M, seed=seed + i).items()}
        agg.handle("update", c, encode_update(M, big, c, rec.number, 10))
    agg._tick()
    clock.t += 2
    agg._tick()
    assert agg.current is None
    return agg.checkpoint.history()[-1]


def test_devices_are_told_to_clip_and_the_global_moves_by_the_clipped_mean(tmp_path):
    clock = FakeClock()
    agg = _aggregator(tmp_path, clock, A.DPSettings(clip=0.5, noise_multiplier=0.0))
    before = dict(agg.global_tensors)
    agg._open_round()
    ann = agg.client.announcements()[-1]
    assert ann.config.clip_norm == 0.5 and ann.config.noise_std is None
    rec = agg.current
    sent = {}
    for i, c in enumerate(sorted(rec.asked)):
        sent[c] = {k: v + 5.0 * (i + 1) for k, v in random_adapter(M, seed=i).items()}
        agg.handle("update", c, encode_update(M, sent[c], c, 0, 10 ** (i + 1)))  # weights do not count
    agg._tick()
    clock.t += 2
    agg._tick()
    after = agg.global_tensors
    want = {k: before[k] + sum(dp.clip_update(u, before, 0.5).tensors[k] - before[k] for u in sent.values()) / 2
            for k in before}
    for k in before:
        np.testing.assert_allclose(after[k], want[k], atol=1e-6)
    row = agg.checkpoint.history()[-1]
    assert row["strategy"] == "dp-fedavg" and row["dp"]["clipped"] == 2 and row["dp"]["q"] == 0.5
    assert row["dp"]["epsilon"] is None and epsilon_of(row) == math.inf  # no noise, no privacy (JSON: null)


def test_epsilon_is_counted_every_round_and_the_budget_stops_the_federation_before_it_is_exceeded(tmp_path):
    clock = FakeClock()
    z, budget = 1.2, 6.0
    agg = _aggregator(tmp_path, clock, A.DPSettings(clip=1.0, noise_multiplier=z, max_epsilon=budget))
    rows = []
    for r in range(10):
        row = _run_round(agg, clock, seed=10 * r)
        if row is None:
            break
        rows.append(row)
    n = len(rows)
    event = A.RoundEvent(0.5, z)  # 2 of the 4 online asked
    for i, row in enumerate(rows):
        assert math.isclose(row["dp"]["epsilon"], A.epsilon([event] * (i + 1)), rel_tol=1e-9)
    assert 0 < n < 10 and A.epsilon([event] * n) <= budget < A.epsilon([event] * (n + 1))
    assert agg.state.done and agg.state.extra["stopped"]["reason"] == "privacy-budget"
    assert agg.state.extra["stopped"]["round"] == n
    summary = privacy_summary(rows, {"extra": agg.state.extra})
    assert f"of a budget of {budget:g}" in summary and f"stopped before round {n}" in summary
    assert "epsilon" in history_table(rows).splitlines()[0]
    # restarted with a larger budget, it goes on counting from the history
    again = _aggregator(tmp_path, clock, A.DPSettings(clip=1.0, noise_multiplier=z, max_epsilon=2 * budget))
    assert not again.state.done and math.isclose(again.privacy.ledger.epsilon, rows[-1]["dp"]["epsilon"])
    row = _run_round(again, clock, seed=99)
    assert math.isclose(row["dp"]["epsilon"], A.epsilon([event] * (n + 1)), rel_tol=1e-9)


def test_a_dp_round_below_quorum_waits_for_the_clients_it_asked_and_asks_no_others(tmp_path):
    clock = FakeClock()
    agg = _aggregator(tmp_path, clock, A.DPSettings(clip=1.0, noise_multiplier=1.0))
    agg._open_round()
    asked = set(agg.current.asked)
    clock.t += 31
    agg._tick()
    assert agg.current.extensions == 1 and agg.current.asked == asked


def test_what_cannot_combine_is_refused(tmp_path):
    clock = FakeClock()
    settings = A.DPSettings(clip=1.0, noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="--strategy median cannot be combined"):
        offline_aggregator(tmp_path / "1", clock, manifest=M, rounds=1, dp=settings, strategy="median")
    with pytest.raises(ConfigError, match="set up by the --dp-\\* options"):
        offline_aggregator(tmp_path / "2", clock, manifest=M, rounds=1, strategy="dp-fedavg",
                           strategy_options={"clip": "1"})
    with pytest.raises(ConfigError, match="distributed needs secure aggregation"):
        offline_aggregator(tmp_path / "3", clock, manifest=M, rounds=1,
                           dp=A.DPSettings(clip=1.0, noise_multiplier=1.0, mode="distributed"))
    for name, options in (("median", {}), ("trimmed-mean", {}), ("norm-bound", {"max_norm": "1"})):
        with pytest.raises(ConfigError, match=f"--strategy {name}: .* looks at each update on its own"):
            offline_aggregator(tmp_path / name, clock, manifest=M, rounds=1, strategy=name, strategy_options=options,
                               secure_aggregation=True)
    with pytest.raises(ConfigError, match="with --secure-aggregation needs --dp-mode distributed"):  # central clips
        offline_aggregator(tmp_path / "4central", clock, manifest=M, rounds=1, secure_aggregation=True,
                           dp=A.DPSettings(clip=1.0, noise_multiplier=1.0))
    distributed = offline_aggregator(tmp_path / "4distributed", clock, manifest=M, rounds=1, secure_aggregation=True,
                                     dp=A.DPSettings(clip=1.0, noise_multiplier=1.0, mode="distributed"))
    assert distributed.secagg is not None and distributed.strategy.name == "dp-fedavg"
    assert distributed.strategy.folds_partials and not distributed.strategy.needs_individual_updates
    with pytest.raises(ConfigError, match="needs synchronous rounds"):
        offline_aggregator(tmp_path / "7", clock, manifest=M, rounds=1, dp=settings, mode="async")
    with pytest.raises(ConfigError, match="needs synchronous rounds"):  # distributed DP + async: still refused
        offline_aggregator(tmp_path / "8", clock, manifest=M, rounds=1, mode="async", secure_aggregation=True,
                           dp=A.DPSettings(clip=1.0, noise_multiplier=1.0, mode="distributed"))
    agg = offline_aggregator(tmp_path / "5", clock, manifest=M, rounds=1, secure_aggregation=True)  # fedavg: a sum
    assert agg.secagg is not None and agg.strategy.name == "fedavg"


def test_a_distributed_round_would_ask_each_device_for_its_noise_share():
    policy = DPPolicy(A.DPSettings(clip=0.5, noise_multiplier=2.0, mode="distributed"))
    config = policy.train_config(TrainConfig(), asked=2)
    assert config.clip_norm == 0.5 and math.isclose(config.noise_std, 2.0 * 0.5 / math.sqrt(2))
    central = DPPolicy(A.DPSettings(clip=0.5, noise_multiplier=2.0)).train_config(TrainConfig(), asked=2)
    assert central.clip_norm == 0.5 and central.noise_std is None


def test_status_and_plot_show_epsilon(tmp_path):
    from flora.broker.report import print_status, write_plot

    clock = FakeClock()
    agg = _aggregator(tmp_path, clock, A.DPSettings(clip=1.0, noise_multiplier=2.0, max_epsilon=100.0))
    for r in range(2):
        _run_round(agg, clock, seed=r)
    lines = []
    assert print_status(tmp_path, out=lines.append) == 0
    text = "\n".join(lines)
    eps = A.epsilon([A.RoundEvent(0.5, 2.0)] * 2)
    assert "epsilon" in lines[1] and f"{eps:.3f}" in text
    assert f"epsilon {eps:.4g} at delta 1e-05 of a budget of 100" in text
    assert write_plot(tmp_path, tmp_path / "plot.png") == 0 and (tmp_path / "plot.png").stat().st_size > 10_000


def test_the_cli_checks_dp_options_and_plans_the_noise(tmp_path, capsys):
    from flora.broker import cli

    base = ["--manifest", str(tmp_path / "m.json"), "--broker", "mqtt://127.0.0.1:1", "--state-dir", str(tmp_path)]
    for extra, message in ((["--dp-noise-multiplier", "1"], "need(s) --dp-clip"),
                           (["--dp-clip", "1"], "--dp-clip needs --dp-noise-multiplier"),
                           (["--dp-mode", "distributed"], "need(s) --dp-clip")):
        assert cli.main(["run", *base, *extra]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["dp-plan", "--devices", "1000", "--clients-per-round", "100", "--rounds", "50",
                     "--epsilon", "8"]) == 0
    z = A.noise_for_epsilon(8.0, 50, 0.1)
    assert f"noise multiplier {z:.4f} for epsilon 8" in capsys.readouterr().out
    assert cli.main(["dp-plan", "--devices", "100", "--rounds", "50", "--noise-multiplier", "1"]) == 0
    assert f"epsilon {A.epsilon([A.RoundEvent(1.0, 1.0)] * 50):.4f} with noise multiplier 1" in capsys.readouterr().out


def test_flora_sim_runs_dp_with_secure_aggregation_in_distributed_mode_only(tmp_path):
    from flora.sim.run import SimConfig, SimError, check_config

    base = dict(out=tmp_path, clients=4, dp_clip=0.5, dp_noise_multiplier=1.0)
    check_config(SimConfig(**base, secure_aggregation=True, dp_mode="distributed"))  # allowed
    with pytest.raises(SimError, match="need --dp-mode distributed"):
        check_config(SimConfig(**base, secure_aggregation=True))
    with pytest.raises(SimError, match="need --mode sync"):
        check_config(SimConfig(**base, secure_aggregation=True, dp_mode="distributed", mode="async"))
