"""flora-aggregator as a real process on a real mosquitto, with scripted clients (no training)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from edge import adapter
from edge.mqtt import BrokerConfig, Connection, make_client
from edge.protocol import RoundAnnouncement, Status, Topics

from .factories import random_adapter

pytestmark = pytest.mark.mqtt
REPO = Path(__file__).resolve().parents[1]
FED = "agg-test"


class ScriptedClients:
    """One connection that plays several devices: statuses, updates, and a view of global/round."""

    def __init__(self, url: str, manifest) -> None:
        self.m = manifest
        self.topics = Topics(FED)
        self.globals: List[adapter.Adapter] = []
        self.rounds: List[RoundAnnouncement] = []
        self.lock = threading.Lock()
        cfg = BrokerConfig.from_url(url)
        self.client = make_client(cfg, "scripted-clients")
        self.client.on_message = self._record
        self.conn = Connection(cfg, self.client, on_connected=lambda c: c.subscribe(
            [(self.topics.global_, 1), (self.topics.round, 1)]))
        self.conn.start()

    def _record(self, client, userdata, msg) -> None:
        with self.lock:
            if msg.topic == self.topics.global_:
                self.globals.append(adapter.decode(bytes(msg.payload), self.m.trainable))
            else:
                self.rounds.append(RoundAnnouncement.from_json(bytes(msg.payload)))

    def online(self, *clients: str) -> None:
        for c in clients:
            self.client.publish(self.topics.status(c), Status(c, "online").to_json(), qos=1,
                                retain=True).wait_for_publish(5)

    def send(self, client: str, blob: bytes) -> None:
        self.client.publish(self.topics.update(client), blob, qos=1).wait_for_publish(5)

    def update(self, client: str, rnd: int, n: int, seed: int, **kw) -> bytes:
        tensors = kw.pop("tensors", None) or random_adapter(self.m, seed)
        return adapter.encode(tensors, model_id=kw.pop("model_id", self.m.model_id), round=rnd, kind="update",
                              client_id=client, num_samples=n, **kw)

    def wait_round(self, number: int, state: str = "training", timeout: float = 30) -> RoundAnnouncement:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for r in reversed(self.rounds):
                    if r.round == number and r.state == state:
                        return r
            time.sleep(0.05)
        raise AssertionError(f"no {state} announcement for round {number}: {self.rounds}")

    def wait_global(self, number: int, timeout: float = 30) -> adapter.Adapter:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for g in self.globals:
                    if g.meta.round == number:
                        return g
            time.sleep(0.05)
        raise AssertionError(f"no global for round {number}")


def start_aggregator(bundle, url: str, state_dir: Path, log: Path, rounds: int, extra=()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "broker.cli", "--bundle", str(bundle.root), "--broker", url, "--rounds",
           str(rounds), "--state-dir", str(state_dir), "--federation", FED, "--wait-for-clients", "3",
           "--min-clients", "3", "--round-timeout", "60", "--lr", "0.002", *extra]
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def weighted_mean(updates: List[Dict[str, np.ndarray]], weights: List[int]) -> Dict[str, np.ndarray]:
    total = sum(weights)
    return {k: sum(w * u[k].astype(np.float64) for u, w in zip(updates, weights)) / total for k in updates[0]}


def assert_global_is(g: adapter.Adapter, expected: Dict[str, np.ndarray]) -> None:
    for k, v in expected.items():
        np.testing.assert_allclose(g.tensors[k], v, rtol=0, atol=1e-6, err_msg=k)


def decoded(blob: bytes) -> Dict[str, np.ndarray]:
    return adapter.decode(blob).tensors


@pytest.fixture
def scripted(mosquitto, tiny_text_bundle):
    clients = ScriptedClients(mosquitto.url, tiny_text_bundle.manifest)
    yield clients
    clients.conn.stop()


def test_only_good_updates_reach_the_global_and_every_rejection_is_counted(
        mosquitto, tiny_text_bundle, scripted, tmp_path):
    m = tiny_text_bundle.manifest
    state_dir, log = tmp_path / "agg", tmp_path / "agg.log"
    proc = start_aggregator(tiny_text_bundle, mosquitto.url, state_dir, log, rounds=2)
    try:
        scripted.online("c1", "c2", "c3")
        r0 = scripted.wait_round(0)
        assert sorted(r0.clients) == ["c1", "c2", "c3"]
        assert scripted.wait_global(0).meta.kind == "global"
        ups0 = {c: scripted.update(c, 0, n, seed) for c, n, seed in (("c1", 10, 1), ("c2", 30, 2), ("c3", 60, 3))}
        ups0["c2"] = scripted.update("c2", 0, 30, 2, dtype="float16")
        for c, blob in ups0.items():
            scripted.send(c, blob)
        g1 = scripted.wait_global(1)
        assert_global_is(g1, weighted_mean([decoded(b) for b in ups0.values()], [10, 30, 60]))

        scripted.wait_round(1)
        good = random_adapter(m, 5)
        nan = {k: v.copy() for k, v in good.items()}
        next(iter(nan.values()))[0, 0] = np.nan
        wrong = dict(good)
        wrong[m.trainable[0].name] = np.zeros((2, 2), np.float32)
        huge = dict(good, padding=np.zeros(adapter.max_blob_bytes(m.trainable) // 4, np.float32))
        scripted.send("c1", scripted.update("c1", 0, 10, 1))                       # late
        scripted.send("c2", scripted.update("c2", 1, 10, 1, model_id="a" * 64))    # foreign model
        scripted.send("c2", scripted.update("c2", 1, 10, 1, tensors=nan))          # NaN
        scripted.send("c3", scripted.update("c3", 1, 10, 1, tensors=wrong))        # wrong shape
        scripted.send("c3", scripted.update("c3", 1, 10, 1, tensors=huge))         # oversized
        scripted.send("c1", b"garbage")                                            # malformed
        ups1 = {c: scripted.update(c, 1, n, seed) for c, n, seed in (("c1", 5, 11), ("c2", 7, 12), ("c3", 11, 13))}
        scripted.send("c1", ups1["c1"])
        scripted.send("c1", scripted.update("c1", 1, 99, 14))                      # duplicate
        scripted.send("c2", ups1["c2"])
        scripted.send("c3", ups1["c3"])
        g2 = scripted.wait_global(2)
        assert_global_is(g2, weighted_mean([decoded(b) for b in ups1.values()], [5, 7, 11]))
        assert scripted.wait_round(2, state="done").round == 2
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = [json.loads(line) for line in (state_dir / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[0]["reported"] == {"c1": 10, "c2": 30, "c3": 60} and rows[0]["rejected"] == []
    assert rows[1]["reported"] == {"c1": 5, "c2": 7, "c3": 11}
    assert rows[1]["rejection_counts"] == {"late": 1, "foreign-model": 1, "non-finite": 1, "bad-tensors": 1,
                                           "oversized": 1, "malformed": 1, "duplicate": 1}
    assert rows[1]["bytes_received"] == sum(len(b) for b in ups1.values())
    assert rows[0]["bytes_sent"] == 3 * rows[0]["global_bytes"]
    status = subprocess.run([sys.executable, "-m", "broker.cli", "status", "--state-dir", str(state_dir)],
                            capture_output=True, text=True, cwd=REPO)
    assert "done, 2 of 2 rounds completed" in status.stdout
    assert "'duplicate': 1" in status.stdout


def test_a_killed_aggregator_resumes_the_open_round_with_the_updates_it_had(
        mosquitto, tiny_text_bundle, scripted, tmp_path):
    state_dir, log = tmp_path / "agg", tmp_path / "agg.log"
    proc = start_aggregator(tiny_text_bundle, mosquitto.url, state_dir, log, rounds=2)
    try:
        scripted.online("c1", "c2", "c3")
        scripted.wait_round(0)
        ups0 = [scripted.update(c, 0, 10, s) for c, s in (("c1", 1), ("c2", 2), ("c3", 3))]
        for c, blob in zip(("c1", "c2", "c3"), ups0):
            scripted.send(c, blob)
        g1 = scripted.wait_global(1)
        scripted.wait_round(1)
        first = scripted.update("c1", 1, 4, 21)
        scripted.send("c1", first)
        deadline = time.monotonic() + 20
        while "accepted update from c1 (4 samples" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with scripted.lock:
            scripted.globals.clear()
            scripted.rounds.clear()

        proc = start_aggregator(tiny_text_bundle, mosquitto.url, state_dir, log, rounds=2)
        again = scripted.wait_global(1)  # re-published: the checkpointed round-1 global, never round 0's
        assert_global_is(again, g1.tensors)
        assert all(g.meta.round == 1 for g in scripted.globals)
        scripted.wait_round(1)
        rest = {"c2": scripted.update("c2", 1, 6, 22), "c3": scripted.update("c3", 1, 10, 23)}
        for c, blob in rest.items():
            scripted.send(c, blob)
        g2 = scripted.wait_global(2)
        assert_global_is(g2, weighted_mean([decoded(first), *[decoded(b) for b in rest.values()]], [4, 6, 10]))
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "1 update(s) restored from the spool" in log.read_text()
    rows = [json.loads(line) for line in (state_dir / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["reported"] == {"c1": 4, "c2": 6, "c3": 10}
