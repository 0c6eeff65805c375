"""The aggregator's durable state: atomic commits, crash repair, the spool, and resuming a round."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from broker.checkpoint import Checkpoint, CheckpointError
from broker.rounds import Sampling
from edge import adapter
from edge.fileio import sha256_bytes

from .factories import encode_update, random_adapter, synthetic_manifest
from .test_aggregator_rounds import FakeClock, metrics, offline_aggregator, status


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
    kw = dict(rounds=3, round_timeout_s=30, sampling=Sampling(clients_per_round=2, min_clients=2, seed=0))
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
    first.handle("update", asked1[0], encode_update(m, random_adapter(m, 20), asked1[0], 0, 12))  # late
    first.handle("update", asked1[0], kept)
    first.handle("metrics", asked1[0], metrics(asked1[0], 1, 0.75))
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
    second.handle("update", asked1[0], kept)  # a redelivery of the restored update: a duplicate
    second._close_round()
    g2 = second.globals()[-1]
    assert g2.meta.round == 2
    for name in g2.tensors:
        expected = (12 * random_adapter(m, 20)[name].astype(np.float64) + 4 * random_adapter(m, 21)[name]) / 16
        np.testing.assert_allclose(g2.tensors[name], expected, rtol=0, atol=1e-6)
    rows = second.checkpoint.history()
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["reported"] == {asked1[0]: 12, asked1[1]: 4}
    assert rows[1]["rejection_counts"] == {"duplicate": 1, "late": 1}
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
