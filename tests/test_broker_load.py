"""The broker must never drop what the aggregator has not read, and one flooding device must not starve the
others: 2,000 simultaneous updates through a generated broker config are all averaged; under a 10,000-message
flood from one device, honest updates are averaged within a second of arrival. (Bigger versions: bench/.)"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from flora.broker.backpressure import Room
from flora.broker.mosquitto import queue_limits, start_mosquitto
from flora.broker.rounds import Sampling
from flora.edge import adapter
from flora.edge.mqtt import BrokerConfig, Connection, connect_properties, make_client
from flora.edge.protocol import RoundAnnouncement, Status, Topics
from flora.edge.synthetic import encode_update, random_adapter, synthetic_manifest, write_bundle

from .fakes import FakeClock, FakeMqttClient, offline_aggregator, status

M = synthetic_manifest(blocks=1, width=8, rank=2, targets=("q",))  # tiny updates: the count is what is tested
FED = "load"


# -- pure parts -------------------------------------------------------------------------------------------
def test_the_room_bounds_count_and_bytes_and_an_oversized_update_fits_alone():
    stop = threading.Event()
    room = Room(count=3, nbytes=100)
    assert room.take(60, stop) and room.take(40, stop)
    taken: List[bool] = []
    waiter = threading.Thread(target=lambda: taken.append(room.take(10, stop, poll_s=0.01)))
    waiter.start()
    time.sleep(0.1)
    assert taken == []  # 100 bytes held: the next waits though a place is free
    room.give(40)
    waiter.join(2)
    assert taken == [True] and (room.held, room.held_bytes) == (2, 70)
    room.give(60)
    room.give(10)
    assert room.take(10_000, stop) and room.held_bytes == 10_000  # alone, a big one is let in
    stop.set()
    assert room.take(1, stop, poll_s=0.01) is False  # stopping: nothing more is held
    with pytest.raises(ValueError):
        Room(0, 1)


def test_queue_limits_hold_a_round_of_the_federation():
    lines = dict(line.split(" ", 1) for line in queue_limits(2000, 1_638_400))
    assert int(lines["max_queued_messages"]) >= 4 * 2000 and int(lines["max_queued_bytes"]) >= 2000 * 1_638_400
    assert int(lines["max_packet_size"]) > 1_638_400
    assert int(dict(ln.split(" ", 1) for ln in queue_limits(100_000, 1000))["max_packet_size"]) > 80 * 100_000
    props = connect_properties(BrokerConfig.from_url("mqtt://h"), max_packet_size=123_456)
    assert props.MaximumPacketSize == 123_456 and props.SessionExpiryInterval == 3600


def test_the_cli_prints_broker_limits_for_a_bundle(tmp_path, capsys):
    from flora.broker.cli import main

    bundle = write_bundle(tmp_path / "b", M)
    assert main(["broker-limits", "--clients", "500", "--bundle", str(bundle)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == queue_limits(500, adapter.max_blob_bytes(M.trainable))
    assert main(["broker-limits", "--clients", "5"]) == 2


def test_a_flooding_device_is_rate_limited_unread_and_counted_with_one_sync_per_batch(tmp_path, monkeypatch):
    from types import SimpleNamespace

    agg = offline_aggregator(tmp_path / "state", FakeClock(), client=FakeMqttClient(), rounds=1,
                             sampling=Sampling(min_clients=1))
    agg._resume_or_start()
    agg.connections = 1
    for c in ("a", "flood"):
        agg.handle("status", c, status(c))
    agg._open_round()
    saves = []
    real = agg.checkpoint.save_open_round
    monkeypatch.setattr(agg.checkpoint, "save_open_round", lambda n, r: (saves.append(n), real(n, r)))
    syncs = agg.checkpoint.journal(0).syncs
    junk = b"junk" * 100
    for mid in range(1, 201):
        agg._on_message(agg.client, None, SimpleNamespace(topic=f"{agg.topics.base}/update/flood", payload=junk,
                                                          mid=mid, qos=1))
    honest = encode_update(agg.manifest, random_adapter(agg.manifest, 1), "a", 0, 7)
    agg._on_message(agg.client, None, SimpleNamespace(topic=agg.topics.update("a"), payload=honest, mid=999, qos=1))
    agg._drain(0)
    counts = agg.current.rejection_counts
    assert counts == {"malformed": 10, "rate-limited": 190}  # the burst was read, the rest only counted
    assert agg.current.reported == {"a": 7} and sorted(m for m, _ in agg.client.acks) == [*range(1, 201), 999]
    # 200 rejections and one update: appended to the journal, one sync for the batch, no rewrite of round.json
    assert agg.checkpoint.journal(0).syncs == syncs + 1 and saves == []
    for _ in range(300):  # a status flood: only the latest status counts
        agg._on_message(agg.client, None, SimpleNamespace(topic=agg.topics.status("flood"),
                                                          payload=status("flood"), mid=0, qos=1))
    agg._on_message(agg.client, None, SimpleNamespace(topic=agg.topics.status("flood"),
                                                      payload=status("flood", "offline"), mid=0, qos=1))
    agg._drain(0)
    assert "flood" not in agg.online


# -- with a real broker ---------------------------------------------------------------------------------
class Fleet:
    """One MQTT connection publishing for many devices (the test broker has no ACL)."""

    def __init__(self, url: str, client_id: str = "fleet") -> None:
        self.topics = Topics(FED)
        self.cfg = BrokerConfig.from_url(url)
        self.client = make_client(self.cfg, client_id)
        self.rounds: List[RoundAnnouncement] = []
        self.client.on_message = lambda c, u, msg: self.rounds.append(RoundAnnouncement.from_json(bytes(msg.payload)))
        self.conn = Connection(self.cfg, self.client, on_connected=lambda c: c.subscribe([(self.topics.round, 1)]))
        self.conn.start(timeout=10)

    def publish_all(self, items, retain: bool = False) -> None:
        infos = [self.client.publish(topic, payload, qos=1, retain=retain) for topic, payload in items]
        for info in infos:
            info.wait_for_publish(60)

    def wait_round(self, number: int, timeout: float) -> RoundAnnouncement:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for r in self.rounds if r.round == number and r.state == "training"]
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no round {number} within {timeout} s")

    def stop(self) -> None:
        self.conn.stop()


def start_aggregator(url: str, tmp: Path, clients: int, *extra: str) -> subprocess.Popen:
    bundle = write_bundle(tmp / "bundle", M)
    log = open(tmp / "aggregator.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "flora.broker.cli", "--bundle", str(bundle), "--broker", url,
                             "--federation", FED, "--rounds", "1", "--state-dir", str(tmp / "state"),
                             "--min-clients", str(clients), "--wait-for-clients", str(clients),
                             "--round-timeout", "120", "--metrics-grace", "0", *extra],
                            stdout=log, stderr=subprocess.STDOUT)


def history(tmp: Path) -> List[Dict]:
    path = tmp / "state" / "history.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def wait_for(what, timeout: float, proc: subprocess.Popen, tmp: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        assert proc.poll() in (None, 0), (tmp / "aggregator.log").read_text()[-3000:]
        time.sleep(0.05)
    raise AssertionError("timed out\n" + (tmp / "aggregator.log").read_text()[-3000:])


@pytest.mark.mqtt
def test_two_thousand_simultaneous_updates_are_all_averaged(mosquitto_binary, tmp_path, monkeypatch):
    n = 2000
    broker = start_mosquitto(tmp_path / "mq", clients=n, max_update_bytes=adapter.max_blob_bytes(M.trainable))
    for name, value in broker.env.items():
        monkeypatch.setenv(name, value)
    fleet = Fleet(broker.url)
    proc = start_aggregator(broker.url, tmp_path, n)
    try:
        ids = [f"d{i:04d}" for i in range(n)]
        fleet.publish_all([(fleet.topics.status(c), Status(c, "online").to_json()) for c in ids], retain=True)
        announced = fleet.wait_round(0, 60)
        assert len(announced.clients) == n  # 2,000 statuses at once: every device counted online
        blobs = {c: encode_update(M, random_adapter(M, i), c, 0, 1 + i % 7) for i, c in enumerate(ids)}
        start = time.monotonic()
        fleet.publish_all(list((fleet.topics.update(c), b) for c, b in blobs.items()))  # all at once
        rows = wait_for(lambda: history(tmp_path), 120, proc, tmp_path)
        took = time.monotonic() - start
    finally:
        fleet.stop()
        proc.kill()
        broker.stop()
    (row,) = rows
    assert row["num_reported"] == n and row["num_rejected"] == 0, row["rejection_counts"]
    expected = {k: sum(np.float64(1 + i % 7) * random_adapter(M, i)[k] for i in range(n)) /
                sum(1 + i % 7 for i in range(n)) for k in random_adapter(M, 0)}
    got = adapter.decode((tmp_path / "state" / "global-000001.safetensors").read_bytes(), M.trainable)
    for k, v in expected.items():
        np.testing.assert_allclose(got.tensors[k], v.astype(np.float32), rtol=0, atol=1e-6)
    print(f"2000 updates averaged {took:.1f} s after they were sent")


def accepted_at(log: Path) -> Dict[str, float]:
    """client -> unix time of its 'accepted update' log line."""
    from datetime import datetime

    out = {}
    for line in log.read_text(errors="replace").splitlines():
        if ": accepted update from " in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out[line.split(": accepted update from ")[1].split(" ")[0]] = stamp
    return out


@pytest.mark.mqtt
def test_honest_updates_are_averaged_within_a_second_under_a_flood_from_one_device(mosquitto, tmp_path):
    honest = ["h1", "h2", "h3"]
    fleet = Fleet(mosquitto.url)
    flooder = Fleet(mosquitto.url, "evil")  # its own connection, as a device has
    proc = start_aggregator(mosquitto.url, tmp_path, len(honest) + 1)
    try:
        fleet.publish_all([(fleet.topics.status(c), Status(c, "online").to_json()) for c in [*honest, "evil"]],
                          retain=True)
        fleet.wait_round(0, 60)
        junk = [(flooder.topics.update("evil"), b"\x00" * 64 + i.to_bytes(4, "little")) for i in range(10_000)]
        flood = threading.Thread(target=flooder.publish_all, args=(junk,))
        flood.start()
        time.sleep(0.3)  # the flood is under way: the honest updates queue behind part of it
        arrived = {}
        for i, c in enumerate(honest):
            fleet.publish_all([(fleet.topics.update(c), encode_update(M, random_adapter(M, i), c, 0, 5))])
            arrived[c] = time.time()  # the broker acknowledged it: it has arrived
        flood.join(120)
        seen = wait_for(lambda: (lambda a: a if set(honest) <= set(a) else None)(
            accepted_at(tmp_path / "aggregator.log")), 60, proc, tmp_path)
        delays = {c: seen[c] - arrived[c] for c in honest}
        assert max(delays.values()) < 1.0, delays
        state = tmp_path / "state" / "spool" / "round-000000" / "round.json"
        counts = wait_for(lambda: (lambda r: r if sum(r.values()) == 10_000 else None)(
            json.loads(state.read_text())["rejection_counts"]), 60, proc, tmp_path)
        assert set(counts) <= {"malformed", "rate-limited"} and counts["rate-limited"] >= 9_000  # every one counted
    finally:
        fleet.stop()
        flooder.stop()
        proc.kill()
    print(f"honest updates averaged {max(delays.values()):.3f} s after arrival, under {sum(counts.values())} junk")
