"""flora-agent against a real mosquitto and a scripted aggregator (a paho client in the test)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
import pytest
from PIL import Image

from flora.edge import adapter
from flora.edge.bundle import ADAPTER
from flora.edge.dataset import load_dataset, split_local
from flora.edge.fileio import sha256_bytes
from flora.edge.mqtt import BrokerConfig, Connection, make_client
from flora.edge.protocol import RoundAnnouncement, Status, Topics, TrainConfig
from flora.edge.state import AgentState, StateStore
from flora.sim.datasets import write_digits

pytestmark = pytest.mark.mqtt
REPO = Path(__file__).resolve().parents[1]
FED = "test-fed"


class ScriptedAggregator:
    """Publishes `global` and `round` like the aggregator; records everything agents publish."""

    def __init__(self, url: str, manifest) -> None:
        self.manifest = manifest
        self.topics = Topics(FED)
        self.messages: List[Tuple[str, bytes]] = []
        self.lock = threading.Lock()
        cfg = BrokerConfig.from_url(url)
        self.client = make_client(cfg, "scripted-aggregator")
        self.client.on_message = self._record
        subs = [(self.topics.all_updates, 1), (self.topics.all_status, 1), (self.topics.all_metrics, 1)]
        self.conn = Connection(cfg, self.client, on_connected=lambda c: c.subscribe(subs))
        self.conn.start()

    def _record(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def publish_global(self, tensors, round_: int, model_id=None) -> bytes:
        blob = adapter.encode(tensors, model_id=model_id or self.manifest.model_id, round=round_, kind="global")
        self.client.publish(self.topics.global_, blob, qos=1, retain=True).wait_for_publish(5)
        return blob

    def publish_round(self, round_: int, blob: bytes, epochs: int = 1, state: str = "training",
                      run_id: str = "") -> None:
        ann = RoundAnnouncement(round_, self.manifest.model_id, state, TrainConfig(epochs=epochs, lr=5e-3,
                                batch_size=32), "all", time.time() + 600, sha256_bytes(blob), 5, run_id=run_id)
        self.client.publish(self.topics.round, ann.to_json(), qos=1, retain=True).wait_for_publish(5)

    def of(self, kind: str) -> List[bytes]:
        with self.lock:
            return [p for t, p in self.messages if t.startswith(f"{self.topics.base}/{kind}/")]

    def statuses(self) -> List[Status]:
        return [Status.from_json(p) for p in self.of("status")]

    def updates(self, round_: int) -> List[adapter.Adapter]:
        decoded = [adapter.decode(p, self.manifest.trainable) for p in self.of("update")]
        return [u for u in decoded if u.meta.round == round_]

    def wait(self, what: Callable[[], bool], timeout: float, label: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if what():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {label}; messages: {[t for t, _ in self.messages]}")


def start_agent(bundle, data: Path, url: str, state_dir: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flora.edge.cli", "--bundle", str(bundle.root), "--data", str(data), "--broker", url,
           "--client-id", "dev-1", "--federation", FED, "--state-dir", str(state_dir), "--val-fraction", "0.2",
           "--progress-every-s", "0.5", *extra]
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def digits_csv(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    ds = write_digits(root / "digits")
    rows = ["path,label"] + [f"{s.path},{ds.classes[s.label]}" for s in ds.train[::5]]  # 288 images
    csv_path = root / "device.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path, len(rows) - 1


def test_agent_trains_submits_refuses_foreign_globals_and_never_submits_twice(
        mosquitto, tiny_text_bundle, digits_csv, tmp_path):
    csv_path, n_images = digits_csv
    m = tiny_text_bundle.manifest
    agg = ScriptedAggregator(mosquitto.url, m)
    initial = adapter.load_file(tiny_text_bundle.path(ADAPTER)).tensors
    state_dir, log = tmp_path / "state", tmp_path / "agent.log"
    agent = start_agent(tiny_text_bundle, csv_path, mosquitto.url, state_dir, log, "--fp16-updates")
    try:
        # round 0: the agent picks up the retained global and round, trains, and publishes its update
        g0 = agg.publish_global(initial, 0)
        agg.publish_round(0, g0)
        agg.wait(lambda: agg.updates(0), 60, "the round-0 update")
        (update,) = agg.updates(0)
        n_train = len(split_local(load_dataset(csv_path, list(m.classes)), 0.2, None, 0)[0])
        assert update.meta.kind == "update" and update.meta.client_id == "dev-1"
        assert update.meta.model_id == m.model_id and update.meta.dtype == "float16"
        assert update.meta.num_samples == n_train  # the stratified split is deterministic
        assert n_train == n_images - round(0.2 * n_images)
        text = log.read_text()  # progress lines a journalctl reader can follow
        assert f"image features: {n_images}/{n_images} images (100%)" in text and " img/s" in text
        assert "round 0: epoch 1/1 step" in text
        moved = max(float(np.abs(update.tensors[k].astype(np.float32) - initial[k]).max()) for k in initial)
        assert moved > 1e-3
        agg.wait(lambda: agg.of("metrics"), 10, "metrics")
        metrics = json.loads(agg.of("metrics")[0])
        assert metrics["round"] == 0 and metrics["samples"] == update.meta.num_samples
        assert metrics["steps"] == -(-update.meta.num_samples // 32) and 0 <= metrics["accuracy"] <= 1
        assert metrics["peak_rss_mb"] > 0 and metrics["backend"] == "ort-training"

        # a global for another model is refused with a reason, and the agent keeps running
        agg.publish_global(initial, 1, model_id="f" * 64)
        agg.wait(lambda: any(s.state == "error" for s in agg.statuses()), 10, "an error status")
        error = [s for s in agg.statuses() if s.state == "error"][-1]
        assert "refused global adapter" in error.last_error and "model_id ffff" in error.last_error
        assert agent.poll() is None

        # round 1, long enough to be killed in the middle of it
        g1 = agg.publish_global({k: v.astype(np.float32) for k, v in update.tensors.items()}, 1)
        agg.publish_round(1, g1, epochs=400)
        agg.wait(lambda: any(s.state == "training" and s.round == 1 for s in agg.statuses()), 30, "training round 1")
        time.sleep(0.5)
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        agg.wait(lambda: agg.statuses()[-1].state == "offline", 10, "the last will (offline)")
        assert agg.updates(1) == []

        agent = start_agent(tiny_text_bundle, csv_path, mosquitto.url, state_dir, log, "--fp16-updates")
        agg.wait(lambda: agg.updates(1), 120, "the round-1 update after a restart")
        # restarted once more after submitting: the retained round 1 must not be trained or sent again
        agg.wait(lambda: agg.statuses()[-1].state == "idle", 10, "idle after round 1")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0
        agent = start_agent(tiny_text_bundle, csv_path, mosquitto.url, state_dir, log, "--fp16-updates",
                            "--exit-when-done")
        agg.wait(lambda: sum(s.state == "online" for s in agg.statuses()) >= 3, 30, "the third start")
        time.sleep(2.0)
        assert len(agg.updates(1)) == 1
        assert "round 1 was already submitted" in log.read_text()

        # the federation ends: the agent exits on its own
        agg.publish_round(1, g1, state="done")
        assert agent.wait(30) == 0
        assert agg.statuses()[-1].state == "offline"
        assert log.read_text().count("sent update") == 2
    finally:
        if agent.poll() is None:
            agent.kill()
        agg.conn.stop()


def test_restarted_agent_sends_its_unacknowledged_update_once_and_never_retrains(
        mosquitto, tiny_text_bundle, tmp_path):
    """A crash between storing an update and the broker's ack: the restart sends those bytes, once."""
    m = tiny_text_bundle.manifest
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name in ("zero", "one"):
        (data / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(data / name / f"{i}.png")
    initial = adapter.load_file(tiny_text_bundle.path(ADAPTER)).tensors
    stored = adapter.encode({k: v + 0.5 for k, v in initial.items()}, model_id=m.model_id, round=0, kind="update",
                            client_id="dev-1", num_samples=7)
    state_dir, log = tmp_path / "state", tmp_path / "agent.log"
    store = StateStore(state_dir)
    store.stash_update(AgentState(client_id="dev-1", model_id=m.model_id, federation=FED, run_id="run-1"), 0, stored)
    agg = ScriptedAggregator(mosquitto.url, m)
    g0 = agg.publish_global(initial, 0)
    agg.publish_round(0, g0, run_id="run-1")
    agent = start_agent(tiny_text_bundle, data, mosquitto.url, state_dir, log)
    try:
        agg.wait(lambda: agg.of("update"), 60, "the stored update")
        agg.wait(lambda: store.load().outbox_sent, 10, "the outbox marked sent")
        agg.publish_round(0, g0, run_id="run-1")  # the round again, as a re-announcing aggregator does
        time.sleep(2.0)
        assert agg.of("update") == [stored]  # those exact bytes, once
        text = log.read_text()
        assert "re-sending the stored update of round 0" in text and "round 0: training" not in text
        assert "round 0 was already submitted" in text
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
        agg.conn.stop()
