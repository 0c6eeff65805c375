"""`--mode async` without a broker: versions every K updates, staleness-weighted rebasing, stale / duplicate
rejections across versions, S + 1 globals kept, and a restart that resumes the buffer exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import List

import numpy as np
import pytest

from flora.broker.aggregator import AggregatorConfig
from flora.broker.async_rounds import AsyncAggregator, make_aggregator
from flora.broker.backpressure import Room
from flora.broker.fedbuff import BufferConfig, Staleness
from flora.edge import adapter
from flora.edge.mqtt import BrokerConfig
from flora.edge.protocol import Metrics, ProtocolError, RoundAnnouncement, Status, TrainConfig
from flora.edge.synthetic import encode_update, random_adapter, synthetic_manifest

from .fakes import FakeMqttClient

M = synthetic_manifest()


class Clock:
    def __init__(self) -> None:
        self.t = 5000.0

    def __call__(self) -> float:
        return self.t


class OfflineAsync(AsyncAggregator):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.published: List = []

    def _publish(self, topic: str, payload: bytes, retain: bool, wait: float = 30.0) -> None:
        self.published.append((topic, payload))

    def globals(self) -> List[adapter.Adapter]:
        return [adapter.decode(p) for t, p in self.published if t == self.topics.global_]

    def announcements(self) -> List[RoundAnnouncement]:
        return [RoundAnnouncement.from_json(p) for t, p in self.published if t == self.topics.round]


def make(tmp_path: Path, clock: Clock, k: int = 3, s: int = 2, staleness: str = "sqrt", lr: float = 1.0,
         rounds: int = 10) -> OfflineAsync:
    cfg = AggregatorConfig(manifest=M, initial_adapter=random_adapter(M, 0), broker=BrokerConfig.from_url(
        "mqtt://127.0.0.1:1"), state_dir=tmp_path / "state", rounds=rounds, federation="fed", mode="async",
        buffer=BufferConfig(k, s, Staleness.parse(staleness), lr))
    agg = OfflineAsync(cfg, FakeMqttClient(), clock=clock)
    agg._resume_or_start()
    for c in "abcdefgh":
        agg.handle("status", c, Status(c, "online").to_json())
    if agg.current is None:
        agg._open_round()
    return agg


def send(agg: AsyncAggregator, client: str, base: int, seed: int, n: int = 10) -> None:
    agg.handle("update", client, encode_update(M, random_adapter(M, seed), client, base, n))
    agg._tick()


def flat(tensors) -> np.ndarray:
    return np.concatenate([np.asarray(tensors[t.name], np.float64).ravel() for t in M.trainable])


def test_make_aggregator_picks_the_mode():
    cfg = AggregatorConfig(manifest=M, initial_adapter=random_adapter(M, 0),
                           broker=BrokerConfig.from_url("mqtt://127.0.0.1:1"), state_dir=Path("/nonexistent-x"),
                           rounds=1, mode="async")
    assert isinstance(make_aggregator(cfg), AsyncAggregator)


def test_a_version_every_k_updates_with_stale_ones_weighted_and_old_ones_rejected(tmp_path):
    clock = Clock()
    agg = make(tmp_path, clock, k=2, s=2, staleness="sqrt")
    first = agg.announcements()[-1]
    assert (first.mode, first.clients, first.buffer, first.max_staleness, first.round) == ("async", "all", 2, 2, 0)
    g0 = flat(agg.global_tensors)
    send(agg, "a", 0, 1, n=3)
    send(agg, "b", 0, 2, n=1)  # K = 2: version 1 is published
    g1 = flat(agg.globals()[-1].tensors)
    np.testing.assert_allclose(g1, (3 * flat(random_adapter(M, 1)) + flat(random_adapter(M, 2))) / 4, atol=1e-7)
    assert agg.announcements()[-1].round == 1 and agg.state.round == 1
    send(agg, "c", 0, 3, n=2)  # one version old: weight 1/(1+1) = 0.5
    send(agg, "a", 1, 4, n=2)  # fresh
    g2 = flat(agg.globals()[-1].tensors)
    step = (2 * 0.5 * (flat(random_adapter(M, 3)) - g0) + 2 * (flat(random_adapter(M, 4)) - g1)) / 4
    np.testing.assert_allclose(g2, g1 + step, atol=1e-6)
    row = agg.checkpoint.history()[-1]
    assert row["mode"] == "async" and row["staleness"] == {"mean": 0.5, "max": 1, "histogram": {"0": 1, "1": 1}}
    assert row["reported"] == {"a@1": 2, "c@0": 2} and row["accepted"][0][:3] == ["c", 0, 2]
    assert row["accepted"][0][3] == pytest.approx(0.5)
    send(agg, "a", 1, 5)  # a already sent from base 1 (in version 1's buffer): duplicate
    send(agg, "d", 0, 6)  # base 0 is 2 versions old: accepted (S = 2), weight 1/(1+sqrt(2))
    send(agg, "e", 3, 7)  # from the future
    rec = agg.current
    assert rec.rejection_counts == {"duplicate": 1, "early": 1}
    assert rec.accepted[0][:2] == ["d", 0] and rec.accepted[0][3] == pytest.approx(1 / (1 + math.sqrt(2)))
    send(agg, "f", 2, 8)  # closes version 2 -> version 3; base 0 falls out of the window
    send(agg, "g", 0, 9)
    assert agg.current.rejection_counts == {"stale": 1}
    kept = sorted(p.name for p in (tmp_path / "state").glob("global-*.safetensors"))
    assert kept == ["global-000001.safetensors", "global-000002.safetensors", "global-000003.safetensors"]


def test_eta_scales_the_step_and_metrics_are_kept_per_base(tmp_path):
    clock = Clock()
    agg = make(tmp_path, clock, k=1, s=1, staleness="constant", lr=0.25)
    g0 = flat(agg.global_tensors)
    agg.handle("update", "a", encode_update(M, random_adapter(M, 1), "a", 0, 5))
    agg.handle("metrics", "a", Metrics("a", 0, 0.4, 0.75, None, 5, 1, 1, 1.0, 0.1, 50.0, "step").to_json())
    assert agg.current.metrics["a@0"]["accuracy"] == 0.75
    agg._tick()
    np.testing.assert_allclose(flat(agg.globals()[-1].tensors), g0 + 0.25 * (flat(random_adapter(M, 1)) - g0),
                               atol=1e-7)
    assert agg.checkpoint.history()[-1]["mean_client_accuracy"] == 0.75


def test_a_restart_mid_buffer_resumes_exactly_and_keeps_the_accepted_pairs(tmp_path):
    events = [("a", 0, 1), ("b", 0, 2), ("c", 0, 3), ("a", 1, 4), ("d", 0, 5)]  # K = 3: version 1 after c
    rest = [("e", 1, 6)]

    whole = make(tmp_path / "whole", Clock(), k=3, s=2)
    for client, base, seed in events + rest:
        send(whole, client, base, seed)
    expected = whole.globals()[-1]

    clock = Clock()
    first = make(tmp_path / "restart", clock, k=3, s=2)
    for client, base, seed in events:
        send(first, client, base, seed)
    first.checkpoint.close_journal()  # a crash: the journal was synced at each batch
    again = make(tmp_path / "restart", clock, k=3, s=2)
    assert again.state.round == 1 and [a[:2] for a in again.current.accepted] == [["a", 1], ["d", 0]]
    send(again, "b", 0, 2)  # accepted in version 0 before the restart: still a duplicate
    send(again, "d", 0, 5)  # accepted in the open buffer before the restart
    assert again.current.rejection_counts == {"duplicate": 2}  # (encode's header order differs between calls)
    (journaled,) = [e.payload for e in again.checkpoint.journaled(1) if e.key == "d@0"]
    again.handle("update", "d", journaled)  # the very bytes again: the broker redelivering an unacked message
    assert again.current.rejection_counts == {"duplicate": 2} and again.current.count == 2
    for client, base, seed in rest:
        send(again, client, base, seed)
    got = again.globals()[-1]
    assert got.meta.round == expected.meta.round == 2
    for name in expected.tensors:
        np.testing.assert_array_equal(got.tensors[name], expected.tensors[name])  # the same bits


def test_round_messages_of_sync_federations_keep_their_shape_and_async_ones_say_their_mode():
    sync = RoundAnnouncement(3, "m", "training", TrainConfig(), ["a"], 1.0, "0" * 64, 5)
    assert not {"mode", "buffer", "max_staleness"} & set(json.loads(sync.to_json()))
    assert RoundAnnouncement.from_json(sync.to_json()) == sync
    fast = RoundAnnouncement(3, "m", "training", TrainConfig(), "all", 1.0, "0" * 64, 5, mode="async", buffer=4,
                             max_staleness=2)
    assert RoundAnnouncement.from_json(fast.to_json()) == fast and fast.is_async and fast.asks("anyone")
    bad = json.loads(fast.to_json())
    bad["mode"] = "eventually"
    with pytest.raises(ProtocolError):
        RoundAnnouncement.from_json(json.dumps(bad))


def test_a_batch_larger_than_the_buffer_fills_versions_of_exactly_k(tmp_path):
    """Messages are handled in batches; the K-th update closes the buffer before the next one is folded."""
    clock = Clock()
    agg = make(tmp_path, clock, k=2, s=3)
    agg._room = Room(10, 1 << 30)
    agg.connections = 1
    for i, c in enumerate("abcde"):
        blob = encode_update(M, random_adapter(M, i), c, 0, 5)
        agg._on_message(agg.client, None, SimpleNamespace(topic=agg.topics.update(c), payload=blob, mid=10 + i,
                                                          qos=1))
    agg._drain(0)  # one batch of five updates: versions 1 and 2 close inside it
    assert [r["num_reported"] for r in agg.checkpoint.history()] == [2, 2]
    assert agg.state.round == 2 and agg.current.count == 1 and agg.client.acked() == [10, 11, 12, 13, 14]
    assert [a[:2] for a in agg.current.accepted] == [["e", 0]]  # two versions old, still in the window


def test_status_and_the_dashboard_read_an_async_state_dir(tmp_path, capsys):
    from flora.broker.dashboard.snapshot import from_state_dir
    from flora.broker.report import print_status

    agg = make(tmp_path, Clock(), k=3)
    send(agg, "a", 0, 1)
    agg.checkpoint.sync()
    agg._save_round(agg.current)
    assert print_status(tmp_path / "state", None) == 0
    assert "1 update(s) accepted so far" in capsys.readouterr().out
    snap = from_state_dir(tmp_path / "state", 0.0)
    assert snap["current"]["reported"] == 1 and snap["current"]["number"] == 0
