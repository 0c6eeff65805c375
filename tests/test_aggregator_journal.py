"""The open round's journal: group commit (one sync per batch, PUBACKs after it), O(1) rejections and metrics,
and restarts that rebuild the round exactly from the snapshot and the journal, however often they happen."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from flora.broker.backpressure import Room
from flora.broker.checkpoint import JOURNAL, OPEN_ROUND
from flora.broker.rounds import Sampling
from flora.edge.synthetic import encode_update, random_adapter

from .fakes import FakeClock, metrics, offline_aggregator, status


def started(tmp_path, clock, clients=("a", "b", "c", "d")):
    agg = offline_aggregator(tmp_path, clock, rounds=2, sampling=Sampling(min_clients=len(clients)))
    agg._resume_or_start()
    agg.connections = 1
    for c in clients:
        agg.handle("status", c, status(c))
    agg._open_round()
    return agg


def deliver(agg, kind: str, client: str, payload: bytes, mid: int) -> None:
    topic = getattr(agg.topics, kind)(client)
    agg._on_message(agg.client, None, SimpleNamespace(topic=topic, payload=payload, mid=mid, qos=1))


def test_a_batch_is_made_durable_by_one_sync_and_rejections_and_metrics_rewrite_nothing(tmp_path):
    clock = FakeClock()
    agg = started(tmp_path, clock)
    m = agg.manifest
    snapshot = agg.checkpoint.spool_dir(0) / OPEN_ROUND
    written = snapshot.stat().st_mtime_ns
    journal = agg.checkpoint.journal(0)
    syncs = journal.syncs
    for i, c in enumerate(("a", "b")):
        deliver(agg, "update", c, encode_update(m, random_adapter(m, i), c, 0, 10 + i), mid=10 + i)
    deliver(agg, "update", "b", encode_update(m, random_adapter(m, 5), "b", 0, 3), mid=12)  # duplicate
    deliver(agg, "update", "c", b"junk", mid=13)  # malformed
    deliver(agg, "metrics", "a", metrics("a", 0, 0.5), mid=14)
    agg._drain(0)
    assert agg.client.acked() == [14, 10, 11, 12, 13]  # metrics at once; the updates after the batch's sync
    assert journal.syncs == syncs + 1  # four updates and a metrics message: one flush
    assert snapshot.stat().st_mtime_ns == written  # rejections and metrics only appended to the journal
    assert agg.current.rejection_counts == {"duplicate": 1, "malformed": 1}
    durable = agg.checkpoint.load_open_round(0, replay=True)
    assert durable["reported"] == {"a": 10, "b": 11} and durable["rejection_counts"] == {"duplicate": 1,
                                                                                         "malformed": 1}
    assert durable["metrics"]["a"]["accuracy"] == 0.5


def test_restarts_rebuild_the_round_from_snapshot_and_journal_without_counting_anything_twice(tmp_path):
    clock = FakeClock()
    agg = started(tmp_path, clock)
    m = agg.manifest
    agg.handle("update", "a", encode_update(m, random_adapter(m, 1), "a", 0, 5))
    agg.handle("update", "a", encode_update(m, random_adapter(m, 2), "a", 0, 5))  # duplicate
    agg.handle("metrics", "a", metrics("a", 0, 0.25))
    clock.t += 10
    agg._tick()  # the snapshot catches up (journal_offset moves past the first records)
    agg.handle("update", "b", encode_update(m, random_adapter(m, 3), "b", 0, 7))
    agg.handle("update", "c", b"junk")  # after the snapshot: only in the journal
    agg.checkpoint.sync()
    expected_sum = agg.strategy._sum.copy()

    for _ in range(3):  # a crash (nothing flushed beyond the last sync), a restart, again and again
        agg.checkpoint.close_journal()
        agg = offline_aggregator(tmp_path, FakeClock(clock.t + 100), rounds=2,
                                 sampling=Sampling(min_clients=4))
        agg._resume_or_start()
        rec = agg.current
        assert rec.reported == {"a": 5, "b": 7}
        assert rec.rejection_counts == {"duplicate": 1, "malformed": 1}  # neither lost nor doubled
        assert rec.metrics["a"]["accuracy"] == 0.25
        np.testing.assert_array_equal(agg.strategy._sum, expected_sum)  # re-folded in arrival order: same bits
    assert agg.current.refused == {"a", "c"}  # a's copy and c's junk: neither will send again this round


def test_a_torn_journal_tail_from_a_crash_mid_write_is_cut_off_and_the_round_goes_on(tmp_path):
    clock = FakeClock()
    agg = started(tmp_path, clock, clients=("a", "b"))
    m = agg.manifest
    agg.handle("update", "a", encode_update(m, random_adapter(m, 1), "a", 0, 5))
    agg.handle("update", "b", encode_update(m, random_adapter(m, 2), "b", 0, 6))
    agg.checkpoint.close_journal()
    path = agg.checkpoint.spool_dir(0) / JOURNAL
    path.write_bytes(path.read_bytes()[:-100])  # b's record torn: it was never acknowledged
    again = offline_aggregator(tmp_path, FakeClock(clock.t + 1), rounds=2, sampling=Sampling(min_clients=2))
    again._resume_or_start()
    assert again.current.reported == {"a": 5}
    again.handle("update", "b", encode_update(m, random_adapter(m, 2), "b", 0, 6))  # the broker resends it
    assert again.current.reported == {"a": 5, "b": 6} and again.current.num_rejected == 0


def test_a_full_batch_leaves_the_rest_of_the_queue_for_the_next_drain(tmp_path, monkeypatch):
    """The batch limit must stop before taking the next message off the queue, never drop it."""
    from flora.broker import aggregator as aggregator_module

    monkeypatch.setattr(aggregator_module, "MAX_BATCH", 2)
    clock = FakeClock()
    clients = [f"c{i}" for i in range(5)]
    agg = started(tmp_path, clock, clients=clients)
    agg._room = Room(10, 1 << 30)  # room for all five in memory at once
    m = agg.manifest
    for i, c in enumerate(clients):
        deliver(agg, "update", c, encode_update(m, random_adapter(m, i), c, 0, 1 + i), mid=20 + i)
    agg._drain(0)
    assert agg.client.acked() == [20, 21] and len(agg.current.reported) == 2  # one batch of two
    agg._drain(0)
    agg._drain(0)
    assert agg.client.acked() == [20, 21, 22, 23, 24] and sorted(agg.current.reported) == clients


def test_a_redelivered_update_is_acked_and_counted_neither_twice_nor_as_a_rejection(tmp_path):
    """A crash between the journal write and the PUBACK: the broker sends the same message again."""
    clock = FakeClock()
    agg = started(tmp_path, clock, clients=("a", "b"))
    m = agg.manifest
    blob = encode_update(m, random_adapter(m, 1), "a", 0, 5)
    agg.handle("update", "a", blob)
    agg.checkpoint.close_journal()
    again = offline_aggregator(tmp_path, FakeClock(clock.t + 1), rounds=2, sampling=Sampling(min_clients=2))
    again._resume_or_start()
    again.handle("update", "a", blob)  # the same bytes: a redelivery
    assert again.current.reported == {"a": 5} and again.current.num_rejected == 0
    again.handle("update", "a", encode_update(m, random_adapter(m, 2), "a", 0, 5))  # other bytes: a duplicate
    assert again.current.rejection_counts == {"duplicate": 1}
