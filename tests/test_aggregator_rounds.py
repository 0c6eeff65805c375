"""The round state machine with a fake clock (no MQTT, no sleeping): sampling, closing, quorum, extension,
and the aggregator's event handling driven through it."""

from __future__ import annotations

import json
from typing import List, Tuple

import numpy as np
import pytest

from flora.broker.aggregator import Aggregator
from flora.broker.influence import InfluencePolicy
from flora.broker.rounds import (
    CLOSE,
    EXTEND,
    GIVE_UP,
    MAX_REJECTION_DETAILS,
    WAIT,
    ClientError,
    QuorumError,
    RoundClock,
    RoundRecord,
    Sampling,
)
from flora.edge import adapter
from flora.edge.fileio import sha256_bytes
from flora.edge.protocol import Status
from flora.edge.synthetic import encode_update, random_adapter

from .fakes import FakeClock, metrics, offline_aggregator, status

# --- sampling -------------------------------------------------------------------------------------


def test_sampling_is_seeded_order_independent_and_respects_the_quorum():
    online = [f"c{i}" for i in range(10)]
    s = Sampling(clients_per_round=3, min_clients=2, seed=7)
    picked = s.choose(online, 4)
    assert len(picked) == 3 and set(picked) <= set(online)
    assert picked == s.choose(reversed(online), 4) == Sampling(clients_per_round=3, min_clients=2, seed=7).choose(
        online, 4)
    assert len({tuple(s.choose(online, r)) for r in range(10)}) > 3  # rounds differ
    assert len(Sampling(fraction=0.25).choose(online, 0)) == 2  # round(2.5) with banker's rounding
    assert len(Sampling(fraction=0.1, min_clients=3).choose(online, 0)) == 3  # never below the quorum
    assert len(Sampling(clients_per_round=50).choose(online, 0)) == 10  # never more than online
    assert Sampling().choose(online, 0) == sorted(online)  # no flag: all
    for bad in (dict(clients_per_round=2, fraction=0.5), dict(fraction=0.0), dict(fraction=1.5),
                dict(clients_per_round=0), dict(min_clients=0)):
        with pytest.raises(ValueError):
            Sampling(**bad)


# --- closing, quorum, extension ------------------------------------------------------------------------


def test_a_round_closes_when_every_asked_client_reported_after_their_metrics_or_a_grace():
    clock = FakeClock()
    rc = RoundClock(Sampling(min_clients=2), timeout_s=60, clock=clock, metrics_grace_s=2)
    rec = rc.open(0, ["a", "b", "c"])
    assert rec.asked == {"a", "b", "c"} and rec.deadline == 1060
    rec.accept("a", 5, 100)
    rec.accept("b", 5, 100)
    assert rc.step(rec, {"a", "b", "c"}).action == WAIT  # quorum, but neither complete nor due
    rec.accept("c", 5, 100)
    rec.metrics["a"] = {"accuracy": 0.5}
    assert rc.step(rec, {"a", "b", "c"}).action == WAIT  # complete: give b's and c's metrics a moment
    clock.t += 1
    rec.metrics["b"] = rec.metrics["c"] = {"accuracy": 0.5}
    assert rc.step(rec, set()).action == CLOSE  # all metrics in: no need to wait out the grace
    rec2 = rc.open(1, ["a", "b"])
    rec2.accept("a", 1, 1)
    rec2.accept("b", 1, 1)
    assert rc.step(rec2, {"a"}).action == WAIT
    clock.t += 2
    assert rc.step(rec2, {"a"}).action == CLOSE  # metrics never came: the grace is over


def test_at_the_deadline_a_quorum_closes():
    clock = FakeClock()
    rc = RoundClock(Sampling(min_clients=2), timeout_s=60, clock=clock)
    rec = rc.open(0, ["a", "b", "c"])
    rec.accept("a", 5, 100)
    rec.accept("b", 5, 100)
    clock.t += 59.9
    assert rc.step(rec, {"c"}).action == WAIT
    clock.t += 0.1
    assert rc.step(rec, {"c"}).action == CLOSE


def test_below_quorum_at_the_deadline_the_round_is_extended_keeping_its_updates():
    clock = FakeClock()
    rc = RoundClock(Sampling(clients_per_round=2, min_clients=2, seed=1), timeout_s=60, clock=clock)
    rec = rc.open(0, ["a", "b", "c", "d"])
    assert len(rec.asked) == 2
    first, second = sorted(rec.asked)
    rec.accept(first, 5, 100)
    clock.t += 60
    # the other asked client is still online: it may still report, so nobody else is asked
    step = rc.step(rec, {"a", "b", "c", "d"})
    assert step.action == EXTEND and step.added == []
    assert rec.deadline == clock.t + 60 and rec.extensions == 1 and rec.reported == {first: 5}
    clock.t += 60
    # now it went offline: one more online client is sampled into the asked list
    others = {"a", "b", "c", "d"} - {first, second}
    step = rc.step(rec, {"a", "b", "c", "d"} - {second})
    assert step.action == EXTEND and len(step.added) == 1 and set(step.added) <= others
    assert rec.asked == {first, second, *step.added} and rec.extensions == 2 and rec.reported == {first: 5}
    rec.accept(step.added[0], 7, 100)
    assert rc.step(rec, set()).action == WAIT  # quorum, but not complete (second is missing) and not due
    clock.t += 60
    assert rc.step(rec, set()).action == CLOSE
    # nobody online to add: the round is extended again and again, never closed below quorum
    lonely = rc.open(1, ["a", "b"])
    lonely.accept("a", 1, 1)
    for i in range(3):
        clock.t += 60
        assert rc.step(lonely, {"a"}).action == EXTEND and lonely.extensions == i + 1


def test_a_record_survives_json_and_keeps_at_most_100_rejection_details():
    rec = RoundRecord(4, {"a", "b"}, 10.0, 70.0)
    rec.accept("a", 3, 1000)
    for i in range(MAX_REJECTION_DETAILS + 20):
        rec.reject("x", "late" if i % 2 else "malformed", "why", 10)
    assert len(rec.rejected) == MAX_REJECTION_DETAILS and rec.num_rejected == MAX_REJECTION_DETAILS + 20
    assert rec.rejection_counts == {"late": 60, "malformed": 60} and rec.bytes_rejected == 1200
    with pytest.raises(ValueError, match="already reported"):
        rec.accept("a", 3, 1000)
    again = RoundRecord.from_json(json.loads(json.dumps(rec.to_json())))
    assert again == rec


# --- the aggregator's event handling without a broker --------------------------------------------------


def test_the_aggregator_runs_rounds_from_events_with_quorum_extension_and_hook(tmp_path):
    clock = FakeClock()
    hook_calls = []

    def on_round_closed(rnd, tensors):
        hook_calls.append((rnd, sorted(tensors)))
        return {"test_accuracy": 0.25 * (rnd + 1)}

    agg = offline_aggregator(tmp_path, clock, rounds=2, round_timeout_s=30,
                             sampling=Sampling(clients_per_round=2, min_clients=2, seed=3),
                             on_round_closed=on_round_closed,
                             influence=InfluencePolicy(max_share=1.0))  # the weighted FedAvg is checked
    m = agg.manifest
    agg._resume_or_start()
    for c in ("a", "b", "c"):
        agg.handle("status", c, status(c))
    agg.handle("status", "d", status("d", "offline"))
    agg.handle("status", "e", b"{not json")
    agg.handle("status", "f", Status("someone-else", "online").to_json())  # status for another id: ignored
    assert agg.online == {"a", "b", "c"}
    agg._open_round()
    asked = sorted(agg.current.asked)
    ann = agg.client.announcements()[-1]
    assert ann.round == 0 and ann.clients == asked and ann.deadline == clock.t + 30
    assert ann.global_sha256 == sha256_bytes(agg.global_blob) and ann.state == "training"
    assert [g.meta.round for g in agg.client.globals()] == []  # run() publishes the global; _open_round only announces

    u0 = encode_update(m, random_adapter(m, 10), asked[0], 0, 30)
    agg.handle("update", asked[0], u0)
    agg.handle("update", asked[0], u0)  # the same bytes again: a redelivery, acked and counted nowhere
    agg.handle("update", asked[0], encode_update(m, random_adapter(m, 11), asked[0], 0, 30))  # duplicate
    agg.handle("metrics", asked[0], metrics(asked[0], 0, 0.5))
    agg.handle("metrics", asked[1], metrics(asked[1], 0, 0.9))  # has not reported: not recorded
    agg.handle("status", asked[1], status(asked[1], "offline"))
    clock.t += 30
    step = agg.rounds.step(agg.current, agg.online)
    assert step.action == EXTEND and len(step.added) == 1
    late_joiner = step.added[0]
    assert late_joiner not in asked and late_joiner in agg.online
    u1 = encode_update(m, random_adapter(m, 11), late_joiner, 0, 10)
    agg.handle("update", late_joiner, u1)
    clock.t += 30
    assert agg.rounds.step(agg.current, agg.online).action == CLOSE
    agg._close_round()

    g1 = agg.client.globals()[-1]
    assert g1.meta.round == 1 and g1.meta.kind == "global"
    for name in g1.tensors:
        expected = (30 * random_adapter(m, 10)[name].astype(np.float64) + 10 * random_adapter(m, 11)[name]) / 40
        np.testing.assert_allclose(g1.tensors[name], expected, rtol=0, atol=1e-6)
    row = agg.checkpoint.history()[-1]
    assert row["round"] == 0 and row["reported"] == {asked[0]: 30, late_joiner: 10}
    assert row["num_asked"] == 3 and row["extensions"] == 1 and row["rejection_counts"] == {"duplicate": 1}
    assert row["bytes_received"] == len(u0) + len(u1) and row["bytes_sent"] == 3 * row["global_bytes"]
    assert list(row["metrics"]) == [asked[0]] and row["metrics"][asked[0]]["accuracy"] == 0.5
    assert row["mean_client_accuracy"] == 0.5 and row["mean_client_loss"] == 0.5
    assert row["test_accuracy"] == 0.25 and row["wall_time_s"] == 60.0
    assert hook_calls == [(0, sorted(t.name for t in m.trainable))]
    assert agg.state.round == 1 and not agg.state.done and agg.current is None


@pytest.mark.parametrize("hook, expected", [
    (lambda r, t: {"test_accuracy": np.float32(0.5), "per_class": np.array([1, 2])},
     {"test_accuracy": 0.5, "per_class": [1, 2]}),  # numpy values become plain JSON
    (lambda r, t: 1 / 0, {"hook_error": "ZeroDivisionError: division by zero"}),
    (lambda r, t: {"model": object()}, {"hook_error": "TypeError: object is not JSON serialisable"}),
])
def test_a_hook_result_lands_in_the_row_and_a_failing_hook_never_loses_the_round(hook, expected, tmp_path):
    agg = offline_aggregator(tmp_path, FakeClock(), rounds=1, on_round_closed=hook)
    agg._resume_or_start()
    agg.handle("status", "a", status("a"))
    agg._open_round()
    agg.handle("update", "a", encode_update(agg.manifest, random_adapter(agg.manifest, 1), "a", 0, 5))
    agg.handle("update", "nobody", b"junk")  # not asked, and garbage: rejected, never raised
    agg._close_round()
    row = agg.checkpoint.history()[-1]
    assert {k: row.get(k) for k in expected} == expected
    assert row["num_reported"] == 1 and row["rejection_counts"] == {"malformed": 1}
    assert agg.state.done and agg.client.globals()[-1].meta.round == 1


# --- extension: who is still pending, and the bound -----------------------------------------------------


def test_an_asked_client_whose_update_was_refused_is_not_waited_for_a_spare_is_asked():
    clock = FakeClock()
    rc = RoundClock(Sampling(min_clients=2), timeout_s=60, clock=clock)
    rec = RoundRecord(0, {"a", "c"}, clock.t, clock.t + 60)
    rec.accept("a", 5, 100)
    rec.reject("c", "non-finite", "tensor x holds NaN", 100)  # c recorded the round as submitted: it won't resend
    clock.t += 60
    assert rc.pending(rec, {"a", "b", "c"}) == set()
    step = rc.step(rec, {"a", "b", "c"})
    assert step.action == EXTEND and step.added == ["b"] and rec.asked == {"a", "b", "c"}


def test_a_refused_update_completes_a_round_only_with_the_quorum():
    clock = FakeClock()
    rc = RoundClock(Sampling(min_clients=2), timeout_s=60, clock=clock, metrics_grace_s=0)
    rec = RoundRecord(0, {"a", "b", "c"}, clock.t, clock.t + 60)
    rec.accept("a", 5, 100)
    rec.reject("c", "bad-tensors", "shape", 100)
    assert rc.step(rec, {"a", "b", "c"}).action == WAIT  # b may still report
    rec.reject("b", "non-finite", "NaN", 100)
    assert not rc.complete(rec) and rc.step(rec, {"a", "b", "c"}).action == WAIT  # all sent, 1 of 2: the deadline
    rec2 = RoundRecord(1, {"a", "b", "c"}, clock.t, clock.t + 60)
    rec2.accept("a", 5, 100)
    rec2.accept("b", 5, 100)
    rec2.reject("c", "non-finite", "NaN", 100)
    assert rc.step(rec2, {"a", "b", "c"}).action == CLOSE  # nobody left to wait for: closes before the deadline


def test_a_client_that_sent_unasked_is_not_sampled_in_later():
    clock = FakeClock()
    rc = RoundClock(Sampling(min_clients=2), timeout_s=60, clock=clock)
    rec = RoundRecord(0, {"a", "b"}, clock.t, clock.t + 60)
    rec.accept("a", 5, 100)
    eager = [f"x{i}" for i in range(8)]
    for x in eager:
        rec.reject(x, "not-asked", f"{x} was not asked", 100)  # it trained this round anyway: it will not resend
    clock.t += 60
    step = rc.step(rec, {"a", "y", *eager})
    assert step.action == EXTEND and step.added == ["y"]


def test_a_late_or_early_update_does_not_count_against_the_client_in_this_round():
    clock = FakeClock()
    rc = RoundClock(Sampling(min_clients=2), timeout_s=60, clock=clock)
    rec = RoundRecord(3, {"a", "c"}, clock.t, clock.t + 60)
    rec.accept("a", 5, 100)
    rec.reject("c", "late", "for round 2", 100)  # a slow client finishing the last round: it may still send 3
    rec.reject("c", "early", "for round 4", 100)
    clock.t += 60
    assert rc.pending(rec, {"a", "b", "c"}) == {"c"}
    step = rc.step(rec, {"a", "b", "c"})
    assert step.action == EXTEND and step.added == [] and rec.asked == {"a", "c"}


def test_clients_in_error_are_not_pending_and_not_sampled():
    clock = FakeClock()
    rc = RoundClock(Sampling(min_clients=3), timeout_s=60, clock=clock)
    rec = RoundRecord(0, {"a", "c", "d"}, clock.t, clock.t + 60)
    rec.accept("a", 5, 100)
    clock.t += 60
    # the aggregator passes the available clients: online and not in `error` (c refused the global; e spare in error)
    available = {"a", "b", "d", "f"}
    assert rc.pending(rec, available) == {"d"}
    step = rc.step(rec, available)
    assert step.action == EXTEND and len(step.added) == 1 and set(step.added) <= {"b", "f"}


def test_a_device_that_cannot_fix_its_error_is_not_asked_and_one_failed_this_round_is_not_waited_for():
    clock = FakeClock()
    rc = RoundClock(Sampling(min_clients=2), timeout_s=600, clock=clock, metrics_grace_s=0)
    errors = {"foreign": ClientError(round=None, code="model-mismatch", message="bundle of another model"),
              "flaky": ClientError(round=2, code="round-failed", message="round 2 failed: non-finite loss")}
    rec = rc.open(3, {"a", "b", "foreign", "flaky"}, errors)
    assert rec.asked == {"a", "b", "flaky"}  # flaky failed an earlier round: it may well train this one
    rec.accept("a", 5, 100)
    rec.accept("b", 5, 100)
    assert rc.step(rec, {"a", "b"}, errors).action == WAIT  # flaky's error is of round 2, not this one
    errors["flaky"] = ClientError(round=3, code="round-failed", message="round 3 failed: non-finite loss")
    clock.t += 1  # long before the deadline
    step = rc.step(rec, {"a", "b"}, errors)
    assert step.action == CLOSE and step.errored == ["flaky"] and rec.errored == {"flaky"}
    assert rc.step(rec, {"a", "b"}, errors).errored == []  # reported once per round
    assert RoundRecord.from_json(json.loads(json.dumps(rec.to_json()))).errored == {"flaky"}


def test_every_asked_client_in_error_below_quorum_still_waits_for_the_deadline_then_extends():
    clock = FakeClock()
    rc = RoundClock(Sampling(min_clients=2), timeout_s=60, clock=clock, metrics_grace_s=0)
    errors = {"x": ClientError(round=0, code=None, message="refused global adapter")}  # an older agent: no code
    rec = rc.open(0, {"a", "x"}, errors)
    assert rec.asked == {"a", "x"}
    rec.accept("a", 5, 100)
    assert rc.step(rec, {"a", "b"}, errors).action == WAIT and rec.errored == {"x"}
    assert rc.pending(rec, {"a", "b", "x"}) == set()
    clock.t += 60
    step = rc.step(rec, {"a", "b"}, errors)
    assert step.action == EXTEND and step.added == ["b"]


def test_after_max_extensions_below_quorum_the_clock_gives_up():
    clock = FakeClock()
    rc = RoundClock(Sampling(min_clients=2), timeout_s=60, clock=clock, max_extensions=2)
    rec = RoundRecord(0, {"a", "b", "c"}, clock.t, clock.t + 60)
    rec.accept("a", 5, 100)
    for expected in (EXTEND, EXTEND, GIVE_UP, GIVE_UP):
        clock.t = rec.deadline
        assert rc.step(rec, {"a", "b"}).action == expected
    assert rec.extensions == 2
    rec.accept("b", 1, 1)  # a quorum at the deadline still closes the round, whatever the count
    assert rc.step(rec, {"a", "b"}).action == CLOSE
    with pytest.raises(ValueError, match="--max-extensions must be >= 0"):
        RoundClock(Sampling(), timeout_s=1, max_extensions=-1)


def _open_with_spare(tmp_path, clock, **kw) -> Tuple[Aggregator, List[str], str]:
    """Three clients online, two asked (quorum 2): (aggregator, asked, the spare)."""
    agg = offline_aggregator(tmp_path, clock, rounds=2, round_timeout_s=30,
                             sampling=Sampling(clients_per_round=2, min_clients=2, seed=3), **kw)
    agg._resume_or_start()
    for c in ("a", "b", "c"):
        agg.handle("status", c, status(c))
    agg._open_round()
    asked = sorted(agg.current.asked)
    return agg, asked, ({"a", "b", "c"} - set(asked)).pop()


def test_a_nan_update_from_an_asked_client_brings_the_spare_in_at_the_extension(tmp_path):
    clock = FakeClock()
    agg, (good, bad), spare = _open_with_spare(tmp_path, clock)
    m = agg.manifest
    nan = random_adapter(m, 2)
    nan[m.trainable[0].name][0, 0] = np.nan
    agg.handle("update", good, encode_update(m, random_adapter(m, 1), good, 0, 3))
    agg.handle("update", bad, encode_update(m, nan, bad, 0, 3))  # rejected: bad will not send round 0 again
    assert agg.online == {"a", "b", "c"}  # ... though it stays online
    clock.t += 30
    agg._tick()
    ann = agg.client.announcements()[-1]
    assert ann.round == 0 and ann.clients == sorted([good, bad, spare]) and ann.deadline == clock.t + 30
    assert agg.current.extensions == 1
    agg.handle("update", spare, encode_update(m, random_adapter(m, 3), spare, 0, 1))
    agg._tick()  # every asked client sent its update (bad's was refused): complete, a grace for metrics
    assert agg.current is not None
    clock.t += 1
    agg._tick()  # closed long before the new deadline
    row = agg.checkpoint.history()[-1]
    assert row["reported"] == {good: 3, spare: 1} and row["rejection_counts"] == {"non-finite": 1}
    assert row["wall_time_s"] == 31.0


def test_an_asked_client_in_error_since_is_replaced_at_the_extension(tmp_path):
    clock = FakeClock()
    agg, (good, stuck), spare = _open_with_spare(tmp_path, clock)
    agg.handle("update", good, encode_update(agg.manifest, random_adapter(agg.manifest, 1), good, 0, 3))
    agg.handle("status", stuck, status(stuck, "error"))  # e.g. it refused the global: it will not train
    assert stuck in agg.online and stuck not in agg.available
    clock.t += 30
    agg._tick()
    assert agg.client.announcements()[-1].clients == sorted([good, stuck, spare])
    agg.handle("status", stuck, status(stuck, "training"))  # it recovered: available again
    assert stuck in agg.available


def test_after_max_extensions_the_aggregator_stops_with_the_round_kept_open(tmp_path):
    clock = FakeClock()
    kw = dict(rounds=1, round_timeout_s=30, max_extensions=1, sampling=Sampling(min_clients=2))
    agg = offline_aggregator(tmp_path, clock, **kw)
    agg._resume_or_start()
    agg.handle("status", "a", status("a"))
    agg.handle("status", "b", status("b"))
    agg._open_round()
    update = encode_update(agg.manifest, random_adapter(agg.manifest, 1), "a", 0, 3)
    agg.handle("update", "a", update)
    agg.handle("status", "b", status("b", "offline"))
    clock.t += 30
    agg._tick()  # extension 1: nobody else to ask
    assert agg.current.extensions == 1 and len(agg.client.announcements()) == 2
    clock.t += 30
    with pytest.raises(QuorumError, match=r"round 0: 1 of 2 needed update\(s\) after 1 extension\(s\)"):
        agg._tick()
    assert agg.checkpoint.history() == []  # nothing committed, nothing published
    again = offline_aggregator(tmp_path, clock, **kw)
    again._resume_or_start()
    assert again.current.reported == {"a": 3} and again.current.extensions == 1


def test_keep_best_auto_keeps_the_global_with_the_best_held_out_accuracy(tmp_path):
    clock = FakeClock()
    accuracies = iter([0.2, 0.7, 0.4])
    agg = offline_aggregator(tmp_path, clock, rounds=3, round_timeout_s=10, sampling=Sampling(min_clients=1),
                             on_round_closed=lambda r, t: {"test_accuracy": next(accuracies)}, keep_best="auto")
    m = agg.manifest
    agg._resume_or_start()
    agg.handle("status", "a", status("a"))
    published = {}
    for r in range(3):
        agg._open_round()
        agg.handle("update", "a", encode_update(m, random_adapter(m, 20 + r), "a", r, 5))
        clock.t += 10
        agg._close_round()
        published[r + 1] = agg.client.globals()[-1]
    best = agg.state.extra["best"]
    assert best["file"] == "global-000002.safetensors" and best["metric"] == "test_accuracy"
    kept = adapter.decode((tmp_path / best["file"]).read_bytes())
    assert kept.meta.round == 2
    for name in kept.tensors:
        np.testing.assert_array_equal(kept.tensors[name], published[2].tensors[name])
    assert sorted(p.name for p in tmp_path.glob("global-*")) == ["global-000002.safetensors",
                                                               "global-000003.safetensors"]
    with pytest.raises(ValueError, match="needs held-out evaluation"):
        offline_aggregator(tmp_path / "other", clock, rounds=1, keep_best="test_accuracy")
