"""flora-aggregator on a real mosquitto with scripted clients (paho, no training): the real CLI as a
subprocess, and the Aggregator class in a thread."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pytest

from flora.broker.aggregator import Aggregator, AggregatorConfig
from flora.broker.influence import InfluencePolicy
from flora.broker.rounds import Sampling
from flora.edge import adapter
from flora.edge.fileio import sha256_bytes
from flora.edge.mqtt import BrokerConfig, Connection, make_client
from flora.edge.protocol import Metrics, RoundAnnouncement, Status, Topics, TrainConfig
from flora.edge.synthetic import encode_update, random_adapter, synthetic_manifest, write_bundle

pytestmark = pytest.mark.mqtt
REPO = Path(__file__).resolve().parents[1]
FED = "agg-test"
M = synthetic_manifest(blocks=2, width=16, rank=4)


class ScriptedClients:
    """One MQTT connection playing several devices: statuses, updates, metrics; records global and round."""

    def __init__(self, url: str, manifest=M, federation: str = FED) -> None:
        self.m = manifest
        self.topics = Topics(federation)
        self.globals: List[adapter.Adapter] = []
        self.global_sha256: Dict[int, str] = {}  # round -> sha256 of the payload as published
        self.rounds: List[RoundAnnouncement] = []
        self.lock = threading.Lock()
        cfg = BrokerConfig.from_url(url)
        self.client = make_client(cfg, f"scripted-{federation}")
        self.client.on_message = self._record
        self.conn = Connection(cfg, self.client, on_connected=lambda c: c.subscribe(
            [(self.topics.global_, 1), (self.topics.round, 1)]))
        self.conn.start(timeout=10)

    def _record(self, client, userdata, msg) -> None:
        with self.lock:
            if msg.topic == self.topics.global_:
                payload = bytes(msg.payload)
                self.globals.append(adapter.decode(payload, self.m.trainable, model_id=self.m.model_id))
                self.global_sha256[self.globals[-1].meta.round] = sha256_bytes(payload)
            elif msg.topic == self.topics.round:
                self.rounds.append(RoundAnnouncement.from_json(bytes(msg.payload)))

    def _pub(self, topic: str, payload: bytes, retain: bool = False) -> None:
        assert self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5) is None

    def status(self, *clients: str, state: str = "online") -> None:
        for c in clients:
            self._pub(self.topics.status(c), Status(c, state).to_json(), retain=True)

    def send(self, client: str, blob: bytes) -> None:
        self._pub(self.topics.update(client), blob)

    def metrics(self, client: str, rnd: int, accuracy: float) -> None:
        self._pub(self.topics.metrics(client), Metrics(client, rnd, 1.0 - accuracy, accuracy, None, 10, 3, 1, 0.5,
                                                       0.05, 120.0, "step").to_json())

    def wait_for(self, what: Callable[[], Optional[object]], timeout: float, describe: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = what()
            if found is not None:
                return found
            time.sleep(0.02)
        with self.lock:
            raise AssertionError(f"timed out waiting for {describe}; rounds seen: "
                                 f"{[(r.round, r.state) for r in self.rounds]}, globals: "
                                 f"{[g.meta.round for g in self.globals]}")

    def wait_round(self, number: int, state: str = "training", timeout: float = 20,
                   after: int = 0) -> RoundAnnouncement:
        return self.wait_for(lambda: next((r for r in self.rounds[after:] if r.round == number and r.state == state),
                                          None), timeout, f"round {number} {state}")

    def wait_global(self, number: int, timeout: float = 20) -> adapter.Adapter:
        return self.wait_for(lambda: next((g for g in self.globals if g.meta.round == number), None), timeout,
                             f"global {number}")

    def forget(self) -> None:
        with self.lock:
            self.globals.clear()
            self.rounds.clear()

    def stop(self) -> None:
        self.conn.stop()


@pytest.fixture
def scripted(mosquitto):
    clients = ScriptedClients(mosquitto.url)
    yield clients
    clients.stop()


def weighted_mean(blobs: Sequence[bytes], weights: Sequence[int]) -> Dict[str, np.ndarray]:
    ups = [adapter.decode(b).tensors for b in blobs]
    return {k: sum(w * u[k].astype(np.float64) for u, w in zip(ups, weights)) / sum(weights) for k in ups[0]}


def assert_global_is(g: adapter.Adapter, expected: Dict[str, np.ndarray]) -> None:
    assert g.meta.kind == "global" and set(g.tensors) == set(expected)
    for k, v in expected.items():
        assert g.tensors[k].dtype == np.float32
        np.testing.assert_allclose(g.tensors[k], v, rtol=0, atol=1e-6, err_msg=k)


def start_cli(args: Sequence[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "flora.broker.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                                cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_log(log: Path, text: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError(f"{text!r} not in the aggregator log:\n{log.read_text(errors='replace')[-3000:]}")


def history(state_dir: Path) -> List[Dict]:
    return [json.loads(line) for line in (state_dir / "history.jsonl").read_text().splitlines()]


def test_the_cli_accepts_only_good_updates_and_counts_every_rejection(mosquitto, scripted, tmp_path):
    bundle = write_bundle(tmp_path / "bundle", M)
    state_dir, log = tmp_path / "agg", tmp_path / "agg.log"
    config = tmp_path / "aggregator.toml"  # the same keys as the long options
    config.write_text(f'broker = "{mosquitto.url}"\nfederation = "{FED}"\nrounds = 2\nmin-clients = 3\n'
                      f'wait_for_clients = 3\nround_timeout = 60\nlr = 0.002\nepochs = 2\nmetrics_grace = 5\n'
                      'max-client-share = 1.0\n')  # the plain num_samples-weighted FedAvg is checked below
    proc = start_cli(["--config", str(config), "--bundle", str(bundle), "--state-dir", str(state_dir)], log)
    try:
        wait_log(log, "waiting for 3 client(s)", proc)
        scripted.status("c1", "c2", "c3")
        r0 = scripted.wait_round(0)
        g0 = scripted.wait_global(0)
        assert r0.clients == ["c1", "c2", "c3"] and r0.config == TrainConfig(epochs=2, lr=0.002)
        assert r0.total_rounds == 2 and r0.model_id == M.model_id
        initial = adapter.load_file(bundle / "adapter.safetensors")
        assert_global_is(g0, initial.tensors)  # round 0 trains from the bundle's initial adapter
        assert r0.global_sha256 == scripted.global_sha256[0]  # an agent trains only on this exact payload
        ups0 = {"c1": encode_update(M, random_adapter(M, 1), "c1", 0, 10),
                "c2": encode_update(M, random_adapter(M, 2), "c2", 0, 30, dtype="float16"),
                "c3": encode_update(M, random_adapter(M, 3), "c3", 0, 60)}
        for c, blob in ups0.items():
            scripted.send(c, blob)
            scripted.metrics(c, 0, 0.5)
        assert_global_is(scripted.wait_global(1), weighted_mean(list(ups0.values()), [10, 30, 60]))

        scripted.wait_round(1)
        good = random_adapter(M, 5)
        nan = {k: v.copy() for k, v in good.items()}
        nan[M.trainable[3].name][1, 1] = np.nan
        wrong = dict(good, **{M.trainable[0].name: np.zeros((2, 2), np.float32)})
        huge = dict(good, padding=np.zeros(adapter.max_blob_bytes(M.trainable) // 4, np.float32))
        mixed = encode_update(M, good, "c3", 1, 10, dtype="float16").replace(b'"dtype":"float16"',
                                                                              b'"dtype":"float32"')
        zero = encode_update(M, good, "c2", 1, 1).replace(b'"num_samples":"1"', b'"num_samples":"0"')
        bad = [("c1", ups0["c1"]),                                                      # late
               ("c1", encode_update(M, good, "c1", 2, 10)),                             # early
               ("c2", encode_update(M, good, "c2", 1, 10, model_id="a" * 64)),          # foreign model
               ("c2", encode_update(M, nan, "c2", 1, 10)),                              # NaN
               ("c3", encode_update(M, wrong, "c3", 1, 10)),                            # wrong shape
               ("c3", encode_update(M, huge, "c3", 1, 10)),  # oversized: over the Maximum Packet Size the
                                                                            # aggregator advertises, never sent to it
               ("c3", mixed),                                                           # fp16 data, fp32 label
               ("c2", zero),                                                            # num_samples 0
               ("c1", b"garbage"),                                                      # malformed
               ("c1", encode_update(M, good, "c2", 1, 10)),                             # sent as someone else
               ("c9", encode_update(M, good, "c9", 1, 10))]                             # never asked
        for c, blob in bad:
            scripted.send(c, blob)
        ups1 = {"c1": encode_update(M, random_adapter(M, 11), "c1", 1, 5),
                "c2": encode_update(M, random_adapter(M, 12), "c2", 1, 7, dtype="float16"),
                "c3": encode_update(M, random_adapter(M, 13), "c3", 1, 11)}
        scripted.send("c1", ups1["c1"])
        scripted.send("c1", encode_update(M, random_adapter(M, 14), "c1", 1, 99))    # duplicate
        for c in ("c2", "c3"):
            scripted.send(c, ups1[c])
        for c, acc in (("c1", 0.6), ("c2", 0.7), ("c3", 0.8)):
            scripted.metrics(c, 1, acc)
        g2 = scripted.wait_global(2)
        assert_global_is(g2, weighted_mean(list(ups1.values()), [5, 7, 11]))
        done = scripted.wait_round(2, state="done")
        assert done.global_sha256 == sha256_bytes((state_dir / "global-000002.safetensors").read_bytes())
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = history(state_dir)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[0]["reported"] == {"c1": 10, "c2": 30, "c3": 60} and rows[0]["num_rejected"] == 0
    assert rows[1]["reported"] == {"c1": 5, "c2": 7, "c3": 11} and rows[1]["asked"] == ["c1", "c2", "c3"]
    assert rows[1]["rejection_counts"] == {
        "late": 1, "early": 1, "foreign-model": 1, "non-finite": 1, "bad-tensors": 1, "bad-dtype": 1,
        "bad-num-samples": 1, "malformed": 1, "client-mismatch": 1, "not-asked": 1, "duplicate": 1}
    assert {r["client"] for r in rows[1]["rejected"]} == {"c1", "c2", "c3", "c9"}
    assert rows[1]["bytes_received"] == sum(len(b) for b in ups1.values())
    assert rows[0]["bytes_sent"] == 3 * rows[0]["global_bytes"] == 3 * len(adapter.encode(
        g0.tensors, model_id=M.model_id, round=0, kind="global"))  # same length, if not the same bytes
    assert rows[1]["mean_client_accuracy"] == pytest.approx(0.7) and rows[1]["metrics"]["c3"]["accuracy"] == 0.8
    text = log.read_text()
    assert "rejected update from c9: not-asked" in text and "federation 'agg-test' done: 2 rounds" in text

    status = subprocess.run([sys.executable, "-m", "flora.broker.cli", "status", "--state-dir", str(state_dir),
                             "--plot", str(tmp_path / "rounds.png")], capture_output=True, text=True, cwd=REPO)
    assert status.returncode == 0, status.stderr
    assert "done; 2 of 2 rounds completed" in status.stdout and "'duplicate': 1" in status.stdout
    assert (tmp_path / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_stopped_or_killed_aggregator_resumes_at_the_right_round_with_the_updates_it_had(
        mosquitto, scripted, tmp_path):
    bundle = write_bundle(tmp_path / "bundle", M)
    state_dir, log = tmp_path / "agg", tmp_path / "agg.log"
    args = ["--bundle", str(bundle), "--broker", mosquitto.url, "--rounds", "3", "--state-dir", str(state_dir),
            "--federation", FED, "--wait-for-clients", "3", "--min-clients", "3", "--metrics-grace", "0"]
    clients = ("c1", "c2", "c3")
    scripted.status(*clients)
    proc = start_cli(args, log)
    try:
        scripted.wait_round(0)
        for i, c in enumerate(clients):
            scripted.send(c, encode_update(M, random_adapter(M, i), c, 0, 10))
        g1 = scripted.wait_global(1)
        scripted.wait_round(1)

        # round 1: one update in, then SIGTERM: a clean stop
        r1 = {c: encode_update(M, random_adapter(M, 10 + i), c, 1, 4 + i) for i, c in enumerate(clients)}
        scripted.send("c1", r1["c1"])
        wait_log(log, "round 1: accepted update from c1", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "stopped in round 1 (resumes there)" in log.read_text()
        scripted.send("c2", r1["c2"])  # while the aggregator is down: its broker session keeps the message
        scripted.forget()

        proc = start_cli(args, log)
        again = scripted.wait_global(1)
        assert_global_is(again, g1.tensors)  # the checkpointed global, not the initial one
        scripted.send("c3", r1["c3"])
        g2 = scripted.wait_global(2)
        assert_global_is(g2, weighted_mean([r1[c] for c in clients], [4, 5, 6]))
        assert all(g.meta.round >= 1 for g in scripted.globals)
        scripted.wait_round(2)

        # round 2: one update in, then SIGKILL: no chance to clean up
        r2 = {c: encode_update(M, random_adapter(M, 20 + i), c, 2, 1 + i) for i, c in enumerate(clients)}
        scripted.send("c3", r2["c3"])
        wait_log(log, "round 2: accepted update from c3", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        scripted.forget()

        proc = start_cli(args, log)
        assert_global_is(scripted.wait_global(2), g2.tensors)
        announced = scripted.wait_round(2)
        assert announced.clients == list(clients)
        assert announced.global_sha256 == scripted.global_sha256[2] == sha256_bytes(
            (state_dir / "global-000002.safetensors").read_bytes())
        for c in ("c1", "c2"):
            scripted.send(c, r2[c])
        assert_global_is(scripted.wait_global(3), weighted_mean([r2[c] for c in clients], [1, 2, 3]))
        assert all(g.meta.round >= 2 for g in scripted.globals)
        scripted.wait_round(3, state="done")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = history(state_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["reported"] == {"c1": 4, "c2": 5, "c3": 6} and rows[2]["reported"] == {"c1": 1, "c2": 2, "c3": 3}
    assert all(r["num_rejected"] == 0 for r in rows)
    assert log.read_text().count("update(s) restored from the spool") == 2


def test_below_quorum_the_round_is_extended_and_republished_and_the_hook_fills_the_row(mosquitto, scripted, tmp_path):
    hook_rounds = []

    def on_round_closed(rnd: int, tensors: Dict[str, np.ndarray]) -> Dict[str, float]:
        hook_rounds.append(rnd)
        return {"test_accuracy": 0.42, "test_norm": float(sum(np.abs(t).sum() for t in tensors.values()))}

    cfg = AggregatorConfig(manifest=M, initial_adapter=random_adapter(M, 0),
                           broker=BrokerConfig.from_url(mosquitto.url), state_dir=tmp_path / "agg", rounds=1,
                           federation=FED, round_timeout_s=1.0,
                           sampling=Sampling(clients_per_round=2, min_clients=2, seed=4), metrics_grace_s=0.0,
                           on_round_closed=on_round_closed, client_id="agg-thread",
                           influence=InfluencePolicy(max_share=1.0))  # the weighted FedAvg is checked
    agg = Aggregator.open(cfg)
    scripted.status("c1", "c2", "c3")
    result: Dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", agg.run()), daemon=True)
    thread.start()
    try:
        first = scripted.wait_round(0)
        asked = list(first.clients)
        assert len(asked) == 2
        reporter, vanished = asked
        spare = ({"c1", "c2", "c3"} - set(asked)).pop()
        u1 = encode_update(M, random_adapter(M, 1), reporter, 0, 3)
        scripted.send(reporter, u1)
        scripted.status(vanished, state="offline")
        t0 = time.monotonic()
        extended = scripted.wait_round(0, after=1, timeout=5)  # the same round, announced again
        assert time.monotonic() - t0 < 3
        assert extended.clients == sorted([*asked, spare]) and extended.deadline >= first.deadline + 0.9
        assert extended.global_sha256 == first.global_sha256
        u2 = encode_update(M, random_adapter(M, 2), spare, 0, 9)
        scripted.send(spare, u2)
        assert_global_is(scripted.wait_global(1), weighted_mean([u1, u2], [3, 9]))
        scripted.wait_round(1, state="done")
        thread.join(10)
        assert not thread.is_alive() and result["rc"] == 0
    finally:
        agg.stop()
        thread.join(10)
    row = agg.checkpoint.history()[0]
    assert row["extensions"] == 1 and row["reported"] == {reporter: 3, spare: 9} and row["num_asked"] == 3
    assert row["test_accuracy"] == 0.42 and row["test_norm"] > 0 and hook_rounds == [0]
    plot = subprocess.run([sys.executable, "-m", "flora.broker.cli", "plot", "--state-dir", str(tmp_path / "agg"),
                           "--out", str(tmp_path / "p.png")], capture_output=True, text=True, cwd=REPO)
    assert plot.returncode == 0 and (tmp_path / "p.png").stat().st_size > 1000, plot.stderr


def test_waiting_for_clients_gives_up_with_a_clear_error(mosquitto, tmp_path):
    bundle = write_bundle(tmp_path / "bundle", M)
    proc = subprocess.run([sys.executable, "-m", "flora.broker.cli", "--manifest", str(bundle / "manifest.json"),
                           "--broker", mosquitto.url,
                           "--state-dir", str(tmp_path / "agg"), "--wait-for-clients", "2", "--wait-timeout", "0.3"],
                          capture_output=True, text=True, cwd=REPO, timeout=30)
    assert proc.returncode == 3
    assert "only 0 of 2 clients came online within 0.3 s" in proc.stderr


def test_below_quorum_through_max_extensions_the_cli_exits_4_and_a_restart_resumes_the_round(
        mosquitto, scripted, tmp_path):
    bundle = write_bundle(tmp_path / "bundle", M)
    state_dir, log = tmp_path / "agg", tmp_path / "agg.log"
    args = ["--bundle", str(bundle), "--broker", mosquitto.url, "--rounds", "1", "--state-dir", str(state_dir),
            "--max-client-share", "1",
            "--federation", FED, "--min-clients", "2", "--round-timeout", "0.3", "--max-extensions", "2"]
    scripted.status("c1", "c2")
    proc = start_cli(args, log)
    try:
        first = scripted.wait_round(0)
        assert first.run_id and first.clients == ["c1", "c2"]
        scripted.send("c1", encode_update(M, random_adapter(M, 1), "c1", 0, 4))
        assert proc.wait(20) == 4
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "round 0: 1 of 2 needed update(s) after 2 extension(s) (--max-extensions 2)" in text
    assert [r.round for r in scripted.rounds].count(0) == 3  # announced, then re-announced at each extension
    scripted.forget()
    proc = start_cli(args[:-2], log)  # restarted without the bound: the same round, its update kept
    try:
        resumed = scripted.wait_round(0)
        assert resumed.run_id == first.run_id and resumed.global_sha256 == first.global_sha256
        update = encode_update(M, random_adapter(M, 2), "c2", 0, 6)
        scripted.send("c2", update)
        assert_global_is(scripted.wait_global(1), weighted_mean(
            [encode_update(M, random_adapter(M, 1), "c1", 0, 4), update], [4, 6]))
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert history(state_dir)[0]["extensions"] == 2
