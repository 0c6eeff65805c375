"""Manual acknowledgement: an update is PUBACKed only once it is spooled to disk or its rejection is saved, so
an aggregator that dies in between gets it again from the broker; status and metrics are acked at once."""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from flora.broker.aggregator import Aggregator, AggregatorConfig
from flora.broker.rounds import Sampling
from flora.edge.mqtt import BrokerConfig, Connection, make_client
from flora.edge.protocol import Status, Topics
from flora.edge.synthetic import encode_update, random_adapter, synthetic_manifest

from .fakes import FakeClock, FakeMqttClient, metrics, offline_aggregator, status

M = synthetic_manifest()


class RecordingClient(FakeMqttClient):
    """The fake client, recording with each ack what the aggregator's state dir held at that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.agg: Optional[Aggregator] = None
        self.snapshots: List[Tuple[int, int, Dict[str, bytes], Optional[dict]]] = []
        self.on_ack = self._snapshot

    def _snapshot(self, mid: int, qos: int) -> None:
        assert self.agg is not None and self.agg.state is not None
        number = self.agg.state.round
        spooled = dict(self.agg.checkpoint.spooled(number))
        # what a restarted aggregator would find: the round's snapshot and its journal (or the no-round record)
        record = self.agg.checkpoint.load_open_round(number, replay=True) or self.agg.checkpoint.load_no_round(number)
        self.snapshots.append((mid, qos, spooled, record))


def recording_aggregator(tmp_path, **kw) -> Aggregator:
    """An offline aggregator, resumed, on its first connection, whose client records a snapshot per ack."""
    fake = RecordingClient()
    agg = offline_aggregator(tmp_path, FakeClock(), client=fake, **kw)
    fake.agg = agg
    agg._resume_or_start()
    agg.connections = 1
    return agg


def deliver(agg: Aggregator, fake: RecordingClient, kind: str, client: str, payload: bytes, mid: int) -> None:
    """What paho's network thread does with an incoming QoS 1 PUBLISH."""
    topic = getattr(agg.topics, kind)(client)
    agg._on_message(fake, None, SimpleNamespace(topic=topic, payload=payload, mid=mid, qos=1))


@pytest.fixture
def agg(tmp_path):
    return recording_aggregator(tmp_path, rounds=2, sampling=Sampling(min_clients=1))


def test_status_and_metrics_are_acked_at_once_an_update_only_after_its_spool_file_exists(agg):
    fake = agg.client
    deliver(agg, fake, "status", "a", status("a"), mid=1)
    assert fake.acked() == [1]  # before the main thread even looked at it
    agg._drain(0)
    agg._open_round()
    blob = encode_update(M, random_adapter(M, 1), "a", 0, 5)
    deliver(agg, fake, "update", "a", blob, mid=2)
    assert fake.acked() == [1]  # queued in memory only: not acknowledged
    agg._drain(0)
    mid, qos, spooled, _ = fake.snapshots[-1]
    assert (mid, qos) == (2, 1) and spooled == {"a": blob}  # the spool file was complete when the ack went out
    deliver(agg, fake, "metrics", "a", metrics("a", 0, 0.5), mid=3)
    assert fake.acked() == [1, 2, 3]


def test_a_rejected_update_is_acked_after_its_rejection_is_saved(agg):
    fake = agg.client
    agg.handle("status", "a", status("a"))
    agg._open_round()
    deliver(agg, fake, "update", "a", encode_update(M, random_adapter(M, 1), "a", 7, 5), mid=5)  # early
    deliver(agg, fake, "update", "a", b"junk", mid=6)
    syncs = agg.checkpoint.journal(0).syncs
    agg._drain(0)
    assert fake.acked() == [5, 6]
    # one batch, one sync (group commit): both rejections were durable before either ack went out
    assert agg.checkpoint.journal(0).syncs == syncs + 1
    assert fake.snapshots[0][3]["rejection_counts"] == {"early": 1, "malformed": 1} and fake.snapshots[1][2] == {}
    assert fake.snapshots[1][3]["rejection_counts"] == {"early": 1, "malformed": 1}


def test_an_update_while_no_round_is_open_is_acked_after_it_is_counted_on_disk(agg):
    fake = agg.client
    deliver(agg, fake, "update", "a", encode_update(M, random_adapter(M, 1), "a", 0, 5), mid=9)
    agg._drain(0)
    assert fake.acked() == [9] and fake.snapshots[0][3]["count"] == 1 and fake.snapshots[0][3]["round"] == 0


def test_an_update_whose_spool_write_fails_is_never_acked(agg, monkeypatch):
    fake = agg.client
    agg.handle("status", "a", status("a"))
    agg._open_round()

    def disk_full(*args) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(agg.checkpoint, "spool", disk_full)
    deliver(agg, fake, "update", "a", encode_update(M, random_adapter(M, 1), "a", 0, 5), mid=4)
    with pytest.raises(OSError, match="No space left"):
        agg._drain(0)  # fatal for the aggregator: the broker keeps the update for its next session
    assert fake.acked() == []


def test_an_update_from_an_earlier_connection_is_not_acked_on_the_new_one(agg):
    fake = agg.client
    agg.handle("status", "a", status("a"))
    agg._open_round()
    deliver(agg, fake, "update", "a", encode_update(M, random_adapter(M, 1), "a", 0, 5), mid=4)
    agg.connections += 1  # reconnected meanwhile: mid 4 may now name another message; the broker resends this one
    agg._drain(0)
    assert fake.acked() == [] and agg.current.reported == {"a": 5}


# --- with a real broker: what the broker does with an update that was never acknowledged --------------------

def _wait(what: Callable[[], Optional[object]], timeout: float, describe: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found is not None:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {describe}")


def _next_event(agg: Aggregator, kind: str, timeout: float = 10):
    def get():
        try:
            event = agg.events.get(timeout=0.05)
        except queue.Empty:
            return None
        return event if event[0] == kind else None
    return _wait(get, timeout, f"a {kind} message")


def _crash(agg: Aggregator) -> None:
    """Die without a DISCONNECT: the broker keeps the session and whatever it was not acknowledged."""
    agg.client.loop_stop()
    agg.client.socket().close()


@pytest.mark.mqtt
def test_an_update_received_but_not_yet_spooled_when_the_aggregator_dies_is_delivered_again(mosquitto, tmp_path):
    topics = Topics("acks")
    broker_cfg = BrokerConfig.from_url(mosquitto.url)
    cfg = AggregatorConfig(manifest=M, initial_adapter=random_adapter(M, 0), broker=broker_cfg,
                           state_dir=tmp_path / "agg", rounds=1, federation="acks", client_id="agg-acks")
    device = make_client(broker_cfg, "device-a")
    device_conn = Connection(broker_cfg, device)
    device_conn.start(timeout=10)

    def publish(topic: str, payload: bytes, retain: bool = False) -> None:
        assert device.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5) is None

    first = Aggregator.open(cfg)
    first._resume_or_start()
    first.connection.start(timeout=10)
    try:
        publish(topics.status("a"), Status("a", "online").to_json(), retain=True)
        _next_event(first, "status")  # subscribed
        handled = encode_update(M, random_adapter(M, 1), "a", 0, 5)
        in_memory = encode_update(M, random_adapter(M, 2), "a", 0, 6)
        publish(topics.update("a"), handled)
        token = first._handle_event(*_next_event(first, "update"))  # no round open: counted on disk
        first._settle([token])  # ... then acked
        # a QoS 1 round trip after the ack: the broker has processed the PUBACK once this is acknowledged
        assert first.client.publish("flora/acks/probe", b"", qos=1).wait_for_publish(5) is None
        publish(topics.update("a"), in_memory)
        event = _next_event(first, "update")
        assert event[2] == in_memory  # received and queued, not yet handled: unacknowledged
    finally:
        _crash(first)

    second = Aggregator.open(cfg)  # the restarted aggregator: same client id, same broker session
    second.connection.start(timeout=10)
    try:
        again = _next_event(second, "update")
        assert again[1] == "a" and again[2] == in_memory  # redelivered by the broker
        time.sleep(0.5)
        later = [e for e in _drain_queue(second) if e[0] == "update"]
        assert later == []  # ... and only that one: the acknowledged update is not sent twice
    finally:
        second.connection.stop()
        device_conn.stop()


def _drain_queue(agg: Aggregator) -> list:
    out = []
    while True:
        try:
            out.append(agg.events.get_nowait())
        except queue.Empty:
            return out


def test_paho_waits_while_max_queued_updates_wait_so_the_rest_stay_at_the_broker(tmp_path):
    agg = recording_aggregator(tmp_path, rounds=1, max_queued_updates=2)
    fake = agg.client
    clients = ["c0", "c1", "c2", "c3"]
    for c in clients:
        agg.handle("status", c, status(c))
    agg._open_round()
    blobs = {c: encode_update(M, random_adapter(M, i), c, 0, 1 + i) for i, c in enumerate(clients)}
    paho = threading.Thread(target=lambda: [deliver(agg, fake, "update", c, blobs[c], mid=i + 1)
                                            for i, c in enumerate(clients)])
    paho.start()
    time.sleep(0.3)
    assert paho.is_alive() and agg.events.qsize() == 2  # the third update waits in paho's thread (and socket)
    while len(agg.current.reported) < len(clients):
        agg._drain(0.5)
    paho.join(5)
    assert not paho.is_alive() and fake.acked() == [1, 2, 3, 4]
    # stopping frees a waiting paho thread, so that loop_stop() can join it
    stuck = threading.Thread(target=lambda: [deliver(agg, fake, "update", "c0", blobs["c0"], mid=9 + i)
                                             for i in range(3)])
    stuck.start()
    time.sleep(0.3)
    assert stuck.is_alive()
    agg.stop()
    stuck.join(2)
    assert not stuck.is_alive()
