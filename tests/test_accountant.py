"""The privacy accountant against Google's dp-accounting called directly, the figures the issue quotes,
the stop-at-budget rule and the noise calibration."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from flora.broker import accountant as A


def _direct(accountant, events, delta=1e-5):
    """The library alone: each (q, z, count) as a self-composed Poisson-sampled (or plain) Gaussian."""
    for q, z, count in events:
        inner = (dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
                 if q < 1 else dp_accounting.GaussianDpEvent(z))
        accountant.compose(inner, count)
    return accountant.get_epsilon(delta)


def test_the_issues_figures_100_devices_all_per_round_and_10000_devices_100_per_round():
    assert 54.2 < A.epsilon([A.RoundEvent.of_round(100, 100, 1.0)] * 50, 1e-5) < 54.6  # "about 54"
    assert 1.30 < A.epsilon([A.RoundEvent.of_round(100, 10_000, 1.0)] * 500, 1e-5) < 1.35  # "about 1.3"


def test_pld_matches_the_library_at_its_default_grid():
    rounds = [A.RoundEvent(0.05, 1.1)] * 30 + [A.RoundEvent(0.2, 1.1)] * 5
    mine = A.epsilon(rounds, 1e-6)
    theirs = _direct(pld_privacy_accountant.PLDAccountant(), [(0.05, 1.1, 30), (0.2, 1.1, 5)], 1e-6)
    assert mine >= theirs * (1 - 1e-9)  # our coarser grid is pessimistic: never below
    assert math.isclose(mine, theirs, rel_tol=2e-3)


def test_rdp_is_the_library_exactly_whatever_the_order_of_the_rounds():
    events = [(0.01, 0.9), (0.3, 1.7), (0.01, 0.9), (1.0, 3.0), (0.3, 1.7)]
    mine = A.epsilon([A.RoundEvent(q, z) for q, z in events], 1e-5, "rdp")
    one_by_one = _direct(rdp_privacy_accountant.RdpAccountant(), [(q, z, 1) for q, z in events])
    assert math.isclose(mine, one_by_one, rel_tol=1e-12)


def test_q_is_rounded_up_so_the_bound_stays_an_upper_bound():
    assert A.round_q(0.01) == 0.01 and A.round_q(0.0123456) == 0.0124 and A.round_q(1 / 3) == 0.334
    assert A.round_q(0.998) == 0.998 and A.round_q(0.9991) == 1.0 and A.round_q(2.0) == 1.0
    exact = _direct(rdp_privacy_accountant.RdpAccountant(), [(0.0123456, 1.0, 100)])
    charged = A.epsilon([A.RoundEvent(0.0123456, 1.0)] * 100, accountant="rdp")
    assert exact <= charged <= exact * 1.01


def test_a_round_is_q_of_the_online_population():
    e = A.RoundEvent.of_round(10, 40, 2.0)
    assert (e.q, e.noise_multiplier) == (0.25, 2.0)
    assert A.RoundEvent.of_round(12, 10, 1.0).q == 1.0  # an extension asked beyond the count at the start
    assert A.RoundEvent.from_json(e.to_json()) == e
    with pytest.raises(A.AccountingError):
        A.RoundEvent.of_round(0, 10, 1.0)
    with pytest.raises(A.AccountingError):
        A.RoundEvent(1.5, 1.0)


def test_edge_cases_no_rounds_no_sampling_no_noise():
    assert A.epsilon([]) == 0.0
    assert A.epsilon([A.RoundEvent(0.0, 1.0)] * 3) == 0.0
    assert A.epsilon([A.RoundEvent(0.5, 0.0)]) == math.inf
    with pytest.raises(A.AccountingError, match="delta"):
        A.epsilon([A.RoundEvent(1.0, 1.0)], delta=0)
    with pytest.raises(A.AccountingError, match="unknown accountant"):
        A.epsilon([], accountant="moments")


def test_the_budget_stops_before_the_round_that_would_exceed_it():
    spent = []
    planned = A.RoundEvent(1.0, 2.0)
    while True:
        decision = A.next_round(spent, planned, max_epsilon=6.0)
        if not decision.allowed:
            break
        spent.append(planned)
    assert A.epsilon(spent) <= 6.0 < A.epsilon([*spent, planned])
    assert decision.epsilon == A.epsilon(spent) and "over the budget of 6" in decision.reason
    n = len(spent)  # the library itself puts the budget between n and n + 1 full rounds at z = 2
    assert _direct(pld_privacy_accountant.PLDAccountant(), [(1.0, 2.0, n)]) <= 6.0
    assert _direct(pld_privacy_accountant.PLDAccountant(), [(1.0, 2.0, n + 1)]) > 6.0
    assert A.next_round(spent, planned, None).allowed  # no budget: only counted
    with pytest.raises(A.AccountingError):
        A.next_round(spent, planned, 0)


def test_a_device_known_to_take_part_gets_no_amplification():
    assert math.isclose(A.epsilon_sampling_known(50, 1.0), A.epsilon([A.RoundEvent(1.0, 1.0)] * 50))
    assert A.epsilon_sampling_known(5, 1.0) > A.epsilon([A.RoundEvent(0.1, 1.0)] * 50)
    assert A.epsilon_sampling_known(0, 1.0) == 0.0


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_noise_calibration_gives_the_smallest_multiplier_within_the_target(accountant):
    z = A.noise_for_epsilon(4.0, 20, 0.25, 1e-5, accountant)
    assert A.epsilon([A.RoundEvent(0.25, z)] * 20, 1e-5, accountant) <= 4.0
    assert A.epsilon([A.RoundEvent(0.25, z - 2e-3)] * 20, 1e-5, accountant) > 4.0 * (1 - 1e-3)


def test_the_ledger_charges_rounds_and_is_rebuilt_from_the_history_rows():
    s = A.DPSettings(clip=1.0, noise_multiplier=1.5, max_epsilon=50.0)
    ledger = A.PrivacyLedger(s)
    rows = []
    for r in range(3):
        reported = {f"c{i}": 10 for i in range(r, r + 4)}
        dp = ledger.charge(asked=4, population=8, effective_noise_multiplier=1.5, reported=reported)
        rows.append({"round": r, "reported": reported, "dp": dp})
    assert rows[-1]["dp"]["q"] == 0.5 and rows[-1]["dp"]["most_rounds_of_one_device"] == 3  # c2, c3
    assert math.isclose(rows[-1]["dp"]["epsilon"], A.epsilon([A.RoundEvent(0.5, 1.5)] * 3))
    assert math.isclose(rows[-1]["dp"]["epsilon_sampling_known"], A.epsilon_sampling_known(3, 1.5))
    again = A.PrivacyLedger(s, [*rows, {"round": 3, "reported": {}}])  # a row without dp (not a DP round)
    assert again.events == ledger.events and again.participation == ledger.participation
    assert math.isclose(again.epsilon, rows[-1]["dp"]["epsilon"])
    decision = again.plan(4, 8)
    assert decision.allowed and math.isclose(decision.epsilon_next, A.epsilon([A.RoundEvent(0.5, 1.5)] * 4))


def test_distributed_planning_assumes_only_the_quorum_adds_noise():
    s = A.DPSettings(clip=1.0, noise_multiplier=2.0, mode="distributed", max_epsilon=100.0)
    d = A.PrivacyLedger(s).plan(asked=16, population=16, min_reports=4)
    assert math.isclose(d.epsilon_next, A.epsilon([A.RoundEvent(1.0, 1.0)]))  # z * sqrt(4/16) = 1


def test_dp_settings_are_checked():
    for bad in (dict(clip=0, noise_multiplier=1), dict(clip=1, noise_multiplier=-1),
                dict(clip=1, noise_multiplier=1, delta=1), dict(clip=1, noise_multiplier=1, max_epsilon=0),
                dict(clip=1, noise_multiplier=1, accountant="gdp"), dict(clip=1, noise_multiplier=1, mode="local")):
        with pytest.raises(A.AccountingError):
            A.DPSettings(**bad)
