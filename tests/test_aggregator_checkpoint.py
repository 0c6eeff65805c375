"""The aggregator's durable state: atomic commits, crash repair, the spool, and resuming a round."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from flora.broker.checkpoint import Checkpoint, CheckpointError
from flora.broker.influence import InfluencePolicy
from flora.broker.rounds import Sampling
from flora.edge import adapter
from flora.edge.fileio import sha256_bytes
from flora.edge.synthetic import encode_update, random_adapter, synthetic_manifest

from .fakes import FakeClock, metrics, offline_aggregator, status


def _row(r):
    return {"round": r, "num_reported": 2}


def test_a_commit_moves_to_the_next_round_atomically(tmp_path):
    cp = Checkpoint(tmp_path)
    assert cp.load() is None
    state = cp.start("m" * 64, 3, b"global-0")
    cp.spool(0, "c1", b"update-c1")
    cp.save_open_round(0, {"number": 0, "asked": ["c1"]})
    assert list(cp.spooled(0)) == [("c1", b"update-c1")] and cp.load_open_round(0)["asked"] == ["c1"]
    new = cp.commit(state, 1, b"global-1", _row(0), done=False)
    assert state.round == 0 and new.round == 1  # the old state object is untouched
    assert list(cp.spooled(0)) == [] and cp.load_open_round(0) is None
    loaded, blob = Checkpoint(tmp_path).load()
    assert loaded == new and blob == b"global-1" and not loaded.done
    assert [r["round"] for r in cp.history()] == [0]
    assert sorted(p.name for p in tmp_path.glob("global-*")) == ["global-000001.safetensors"]
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_a_crash_between_state_and_history_is_repaired_once(tmp_path):
    cp = Checkpoint(tmp_path)
    state = cp.start("m" * 64, 3, b"g0")
    state = cp.commit(state, 1, b"g1", _row(0), done=False)
    # a crash after state.json switched to round 2, before the row was appended (and a torn line)
    state.last_row, state.round = _row(1), 2
    (tmp_path / "global-000002.safetensors").write_bytes(b"g2")
    state.global_file, state.global_sha256 = "global-000002.safetensors", sha256_bytes(b"g2")
    cp.save(state)
    with open(tmp_path / "history.jsonl", "a") as fh:
        fh.write('{"round": 1, "torn')
    loaded, blob = Checkpoint(tmp_path).load()
    assert loaded.round == 2 and blob == b"g2"
    assert [r["round"] for r in cp.history()] == [0, 1]
    Checkpoint(tmp_path).load()
    assert [r["round"] for r in cp.history()] == [0, 1]


def test_spools_of_finished_rounds_are_dropped_on_load(tmp_path):
    cp = Checkpoint(tmp_path)
    state = cp.start("m" * 64, 3, b"g0")
    cp.spool(0, "c1", b"u")
    cp.commit(state, 1, b"g1", _row(0), done=False)
    cp.spool(0, "c2", b"left over by a crash between commit and cleanup")
    cp.spool(1, "c3", b"the open round's")
    Checkpoint(tmp_path).load()
    assert list(cp.spooled(0)) == [] and list(cp.spooled(1)) == [("c3", b"the open round's")]
    (cp.spool_dir(1) / "round.json").write_text("{torn")
    assert cp.load_open_round(1) is None  # unreadable: the round is opened afresh


def test_one_state_dir_serves_one_aggregator_at_a_time(tmp_path):
    first, second = Checkpoint(tmp_path), Checkpoint(tmp_path)
    first.lock()
    with pytest.raises(CheckpointError, match=rf"in use by another flora-aggregator \(pid {os.getpid()}\)"):
        second.lock()
    first.unlock()
    second.lock()
    second.unlock()


def test_a_corrupt_or_foreign_state_is_refused(tmp_path):
    cp = Checkpoint(tmp_path)
    cp.start("m" * 64, 3, b"g0")
    (tmp_path / "global-000000.safetensors").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        cp.load()
    (tmp_path / "global-000000.safetensors").unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        cp.load()
    (tmp_path / "state.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CheckpointError, match="unreadable"):
        cp.load()
    clock = FakeClock()
    other = tmp_path / "other"
    offline_aggregator(other, clock, rounds=1)._resume_or_start()
    with pytest.raises(CheckpointError, match="belongs to model"):
        offline_aggregator(other, clock, rounds=1, manifest=synthetic_manifest(width=8))._resume_or_start()


def test_a_restarted_aggregator_resumes_the_open_round_with_its_clients_updates_and_rejections(tmp_path):
    clock = FakeClock()
    kw = dict(rounds=3, round_timeout_s=30, sampling=Sampling(clients_per_round=2, min_clients=2, seed=0),
              influence=InfluencePolicy(max_share=1.0))  # the weighted FedAvg is checked
    first = offline_aggregator(tmp_path, clock, **kw)
    m = first.manifest
    first._resume_or_start()
    for c in ("a", "b", "c"):
        first.handle("status", c, status(c))
    first._open_round()
    asked0 = sorted(first.current.asked)
    for i, c in enumerate(asked0):
        first.handle("update", c, encode_update(m, random_adapter(m, i), c, 0, 10))
    first._close_round()
    first._open_round()
    asked1 = sorted(first.current.asked)
    kept = encode_update(m, random_adapter(m, 20), asked1[0], 1, 12)
    first.handle("update", asked1[0], kept)
    first.handle("metrics", asked1[0], metrics(asked1[0], 1, 0.75))
    # the rejection comes last: nothing but the rejection itself can have saved it
    first.handle("update", asked1[0], encode_update(m, random_adapter(m, 20), asked1[0], 0, 12))  # late
    g1 = first.global_blob
    del first  # killed: nothing else is written

    clock.t += 100
    second = offline_aggregator(tmp_path, clock, **kw)
    second._resume_or_start()
    rec = second.current
    assert second.state.round == 1 and second.global_blob == g1  # the round-1 global, never round 0's
    assert adapter.decode(second.global_blob).meta.round == 1
    assert rec is not None and rec.number == 1 and sorted(rec.asked) == asked1
    assert rec.reported == {asked1[0]: 12} and rec.rejection_counts == {"late": 1}
    assert rec.metrics[asked1[0]]["accuracy"] == 0.75 and rec.deadline == clock.t + 30
    # the other asked client submits after the restart; the round closes with both
    last = encode_update(m, random_adapter(m, 21), asked1[1], 1, 4)
    second.handle("update", asked1[1], last)
    second.handle("update", asked1[0], kept)  # a redelivery of the restored update: acked, counted nowhere
    second._close_round()
    g2 = second.client.globals()[-1]
    assert g2.meta.round == 2
    for name in g2.tensors:
        expected = (12 * random_adapter(m, 20)[name].astype(np.float64) + 4 * random_adapter(m, 21)[name]) / 16
        np.testing.assert_allclose(g2.tensors[name], expected, rtol=0, atol=1e-6)
    rows = second.checkpoint.history()
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["reported"] == {asked1[0]: 12, asked1[1]: 4}
    assert rows[1]["rejection_counts"] == {"late": 1}
    assert rows[1]["bytes_received"] == len(kept) + len(last) and rows[1]["wall_time_s"] == 100.0


def test_a_finished_federation_stays_done_unless_more_rounds_are_asked_for(tmp_path):
    clock = FakeClock()
    agg = offline_aggregator(tmp_path, clock, rounds=1)
    agg._resume_or_start()
    agg.handle("status", "a", status("a"))
    agg._open_round()
    agg.handle("update", "a", encode_update(agg.manifest, random_adapter(agg.manifest, 1), "a", 0, 5))
    agg._close_round()
    assert agg.state.done and agg.state.round == 1
    again = offline_aggregator(tmp_path, clock, rounds=1)
    again._resume_or_start()
    assert again.state.done and again.current is None
    more = offline_aggregator(tmp_path, clock, rounds=3)
    more._resume_or_start()
    assert not more.state.done and more.state.rounds_total == 3 and more.state.round == 1
    assert json.loads((tmp_path / "state.json").read_text())["rounds_total"] == 3


# --- implausible weights and non-finite aggregates never reach the checkpoint --------------------------------


def _one_client_round(tmp_path, clock, **kw):
    agg = offline_aggregator(tmp_path, clock, rounds=2, **kw)
    agg._resume_or_start()
    agg.handle("status", "a", status("a"))
    agg._open_round()
    return agg


@pytest.mark.parametrize("num_samples", [10 ** 308, 10 ** 400])
def test_an_implausible_num_samples_is_rejected_before_it_is_spooled_or_folded(num_samples, tmp_path):
    agg = _one_client_round(tmp_path, FakeClock())
    m = agg.manifest
    agg.handle("update", "a", encode_update(m, random_adapter(m, 1), "a", 0, num_samples))
    assert agg.current.reported == {} and agg.current.rejection_counts == {"bad-num-samples": 1}
    assert list(agg.checkpoint.spooled(0)) == [] and agg.strategy.count == 0
    assert agg.checkpoint.load_open_round(0, replay=True)["rejection_counts"] == {"bad-num-samples": 1}
    good = random_adapter(m, 2)
    agg.handle("update", "a", encode_update(m, good, "a", 0, 7))  # a's next, sane update still counts
    agg._close_round()
    np.testing.assert_array_equal(agg.client.globals()[-1].tensors[m.trainable[0].name], good[m.trainable[0].name])


def test_a_spooled_update_that_no_longer_validates_is_counted_once_and_never_crashes_a_restart(tmp_path):
    clock = FakeClock()
    agg = _one_client_round(tmp_path, clock)
    m = agg.manifest
    # what an older aggregator without the cap accepted and spooled: 10**400 made float() raise on every re-fold
    agg.checkpoint.spool(0, "a", encode_update(m, random_adapter(m, 1), "a", 0, 10 ** 400))
    for _ in range(2):  # restarted twice: counted once, the spool file is gone after the first
        again = offline_aggregator(tmp_path, clock, rounds=2)
        again._resume_or_start()
        assert again.current.reported == {} and again.current.rejection_counts == {"bad-num-samples": 1}
        assert list(again.checkpoint.spooled(0)) == []


def _refuse(self):
    raise ValueError("a strategy's own reason")


@pytest.mark.parametrize("broken, why", [
    (None, "the fedavg aggregate of tensor .* is not finite"),  # the float64 sums overflow to inf
    (_refuse, "the fedavg aggregate cannot be computed: a strategy's own reason"),
], ids=["overflow", "strategy-error"])
def test_a_non_finite_aggregate_is_never_committed_or_published_and_the_round_fails_clearly(
        broken, why, tmp_path, caplog, monkeypatch):
    clock = FakeClock()
    # a misconfigured cap lets weights through whose float64 weighted sum overflows: 1e300 * 1e9
    agg = _one_client_round(tmp_path, clock, max_num_samples=10 ** 300)
    m = agg.manifest
    agg.handle("status", "b", status("b"))
    agg.current.asked.add("b")
    big = {k: np.full_like(v, 1e9) for k, v in random_adapter(m, 1).items()}
    for c in ("a", "b"):
        agg.handle("update", c, encode_update(m, big, c, 0, 10 ** 300))
    assert agg.current.reported == {"a": 10 ** 300, "b": 10 ** 300}
    if broken is not None:
        monkeypatch.setattr(type(agg.strategy), "finalize", broken)
    g0 = dict(agg.global_tensors)
    agg._close_round()
    assert re.search(f"round 0 FAILED: {why}; its 2 update", caplog.text)
    published = agg.client.globals()[-1]
    assert published.meta.round == 1  # the next round starts from the unchanged global
    for name, arr in g0.items():
        np.testing.assert_array_equal(published.tensors[name], arr)
    row = agg.checkpoint.history()[-1]
    assert row["round"] == 0 and re.fullmatch(why, row["failed"]) and sorted(row["reported"]) == ["a", "b"]
    assert "test_accuracy" not in row and agg.state.round == 1
    again = offline_aggregator(tmp_path, clock, rounds=2)
    again._resume_or_start()  # the aggregator resumes from its own checkpoint
    assert again.state.round == 1 and again.global_blob == agg.global_blob


def test_a_cap_beyond_float64_weights_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--max-num-samples must be >= 1 and <= 1e300"):
        offline_aggregator(tmp_path, FakeClock(), rounds=1, max_num_samples=10 ** 301)


# --- updates while no round is open -----------------------------------------------------------------------


def test_updates_while_no_round_is_open_are_counted_in_the_next_round_and_survive_a_restart(tmp_path):
    clock = FakeClock()
    kw = dict(rounds=2, sampling=Sampling(min_clients=1))
    agg = offline_aggregator(tmp_path, clock, **kw)
    m = agg.manifest
    agg._resume_or_start()
    agg.handle("update", "a", encode_update(m, random_adapter(m, 1), "a", 0, 5))  # before round 0 opened
    agg.handle("status", "a", status("a"))
    agg._open_round()
    assert agg.current.rejection_counts == {"no-round": 1} and agg.current.reported == {}
    assert agg.current.rejected[0]["detail"] == "no round was open (the next is round 0); the update says round 0"
    agg.handle("update", "a", encode_update(m, random_adapter(m, 2), "a", 0, 5))
    agg._close_round()
    agg.handle("update", "b", encode_update(m, random_adapter(m, 3), "b", 0, 5))  # between rounds 0 and 1
    agg.handle("update", "c", b"junk")
    del agg  # killed before round 1 opened

    again = offline_aggregator(tmp_path, clock, **kw)
    again._resume_or_start()
    again.handle("status", "a", status("a"))
    again._open_round()
    assert again.current.rejection_counts == {"no-round": 2}
    assert [r["client"] for r in again.current.rejected] == ["b", "c"]
    assert again.current.bytes_rejected > 4 and "round ?" in again.current.rejected[1]["detail"]
    # killed right after round 1 opened: its record holds them, and they are not counted twice
    third = offline_aggregator(tmp_path, clock, **kw)
    third._resume_or_start()
    assert third.current.rejection_counts == {"no-round": 2}
    third.handle("update", "a", encode_update(m, random_adapter(m, 4), "a", 1, 5))
    third._close_round()
    rows = third.checkpoint.history()
    assert rows[0]["rejection_counts"] == {"no-round": 1} and rows[1]["rejection_counts"] == {"no-round": 2}


# --- the run id ------------------------------------------------------------------------------------------


def test_a_fresh_start_gets_a_random_run_id_that_a_resume_keeps_and_every_round_message_carries(tmp_path):
    clock = FakeClock()
    agg = _one_client_round(tmp_path / "one", clock)
    run_id = agg.state.run_id
    assert len(run_id) == 16 and int(run_id, 16) >= 0
    assert json.loads((tmp_path / "one" / "state.json").read_text())["run_id"] == run_id
    agg.handle("update", "a", encode_update(agg.manifest, random_adapter(agg.manifest, 1), "a", 0, 5))
    agg._close_round()
    again = offline_aggregator(tmp_path / "one", clock, rounds=2)
    again._resume_or_start()
    assert again.state.run_id == run_id
    again.handle("status", "a", status("a"))
    again._open_round()
    again.handle("update", "a", encode_update(again.manifest, random_adapter(again.manifest, 2), "a", 1, 5))
    again._close_round()
    again._announce_done()
    announcements = agg.client.announcements() + again.client.announcements()
    assert [a.state for a in announcements] == ["training", "training", "done"]
    assert {a.run_id for a in announcements} == {run_id}
    other = _one_client_round(tmp_path / "two", clock)
    assert other.state.run_id != run_id and other.client.announcements()[-1].run_id == other.state.run_id


# -- which globals a state dir keeps (--keep-globals, --keep-best) ---------------------------------
def _commit_rounds(cp, metric, values):
    state = cp.start("m" * 64, len(values), b"g0")
    for r, value in enumerate(values):
        state = cp.commit(state, r + 1, f"g{r + 1}".encode(), {"round": r, metric: value}, done=False)
    return state


def _globals(tmp_path):
    return sorted(p.name for p in tmp_path.glob("global-*.safetensors"))


def test_keep_the_latest_globals_and_the_best_one(tmp_path):
    from flora.broker.checkpoint import KeepPolicy

    cp = Checkpoint(tmp_path, KeepPolicy(globals=2, best="test_accuracy"))
    state = _commit_rounds(cp, "test_accuracy", [0.5, 0.9, None, 0.7, 0.9, 0.6])
    assert state.extra["best"] == {"file": "global-000002.safetensors", "round": 1, "rounds_completed": 2,
                                   "metric": "test_accuracy", "value": 0.9}  # the tie at round 4 keeps the earlier
    assert _globals(tmp_path) == ["global-000002.safetensors", "global-000005.safetensors",
                                  "global-000006.safetensors"]
    assert (tmp_path / "global-000002.safetensors").read_bytes() == b"g2"
    loaded, _ = Checkpoint(tmp_path).load()
    assert loaded.extra["best"]["file"] == "global-000002.safetensors"  # survives a restart


def test_keep_all_globals_and_the_default_keeps_only_the_latest(tmp_path):
    from flora.broker.checkpoint import KeepPolicy

    _commit_rounds(Checkpoint(tmp_path / "all", KeepPolicy(globals=None)), "x", [1, 2, 3])
    assert len(_globals(tmp_path / "all")) == 4  # the initial global too
    state = _commit_rounds(Checkpoint(tmp_path / "one"), "mean_client_accuracy", [0.9, 0.1])
    assert _globals(tmp_path / "one") == ["global-000002.safetensors"] and "best" not in state.extra


def test_the_initial_global_can_be_the_best(tmp_path):
    from flora.broker.checkpoint import KeepPolicy

    cp = Checkpoint(tmp_path, KeepPolicy(best="test_accuracy"))
    state = cp.start("m" * 64, 2, b"g0")
    cp.note_initial(state, {"test_accuracy": 0.8})
    for r, acc in enumerate([0.3, 0.5]):
        state = cp.commit(state, r + 1, b"g", {"round": r, "test_accuracy": acc}, done=False)
    assert state.extra["best"]["file"] == "global-000000.safetensors" and state.extra["best"]["rounds_completed"] == 0
    assert _globals(tmp_path) == ["global-000000.safetensors", "global-000002.safetensors"]


def test_keep_options_and_the_auto_metric():
    from flora.broker.checkpoint import KeepPolicy, parse_keep_globals, resolve_best_metric

    assert parse_keep_globals("all") is None and parse_keep_globals("3") == 3 and parse_keep_globals(5) == 5
    with pytest.raises(ValueError, match="a number or 'all'"):
        parse_keep_globals("some")
    with pytest.raises(ValueError, match=">= 1 or 'all'"):
        KeepPolicy(globals=0)
    assert resolve_best_metric("auto", evaluation_configured=True) == "test_accuracy"
    assert resolve_best_metric("auto", evaluation_configured=False) == "mean_client_accuracy"
    assert resolve_best_metric(None, True) is None


def test_status_names_the_best_model_file(tmp_path, capsys):
    from flora.broker.checkpoint import KeepPolicy
    from flora.broker.report import print_status

    cp = Checkpoint(tmp_path, KeepPolicy(globals=None, best="mean_client_accuracy"))
    state = cp.start("m" * 64, 3, b"g0")
    for r, acc in enumerate([0.4, 0.8, 0.6]):
        row = {"round": r, "num_asked": 2, "num_reported": 2, "mean_client_accuracy": acc, "bytes_received": 10,
               "bytes_sent": 10, "wall_time_s": 1.0}
        state = cp.commit(state, r + 1, b"g", row, done=r == 2)
    assert print_status(tmp_path) == 0
    out = capsys.readouterr().out
    assert f"best model: {tmp_path / 'global-000002.safetensors'} (after 2 rounds: mean client accuracy 0.8000)" in out
    assert f"latest model: {tmp_path / 'global-000003.safetensors'}" in out and "4 globals kept" in out


def test_load_sweeps_orphan_globals_but_keeps_the_kept_ones_and_the_async_window(tmp_path):
    from flora.broker.checkpoint import KeepPolicy

    cp = Checkpoint(tmp_path, KeepPolicy(globals=2, best="test_accuracy"))
    _commit_rounds(cp, "test_accuracy", [0.9, 0.1, 0.2, 0.3])
    (tmp_path / "global-000005.safetensors").write_bytes(b"next")  # a kill before state.json switched to it
    (tmp_path / "global-000000.safetensors").write_bytes(b"old")  # a kill before the previous one was deleted
    state, _ = Checkpoint(tmp_path, KeepPolicy(globals=2, best="test_accuracy")).load()
    assert _globals(tmp_path) == ["global-000001.safetensors", "global-000003.safetensors",
                                  "global-000004.safetensors"]  # the best, the 2 latest; no orphan
    state.extra["async"] = {"window": ["global-000002.safetensors", "global-000003.safetensors",
                                       "global-000004.safetensors"]}
    (tmp_path / "global-000002.safetensors").write_bytes(b"g2")
    cp.save(state)
    Checkpoint(tmp_path).load()  # the default policy keeps one, the async window keeps its three, the best stays
    assert _globals(tmp_path) == ["global-000001.safetensors", "global-000002.safetensors",
                                  "global-000003.safetensors", "global-000004.safetensors"]
