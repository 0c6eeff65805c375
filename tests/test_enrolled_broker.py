"""A real mosquitto with the per-device certificate template and the ACL `flora-aggregator enroll` writes:
each device logs in with its own certificate, may publish only its own topics of its own federation,
reads only what it should, and is cut off by `revoke` (and a reload)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from flora.broker.enroll import FederationPKI
from flora.broker.mosquitto import free_port, launch_mosquitto, run_as_invoking_user
from flora.edge.mqtt import BrokerConfig, Connection, make_client

TEMPLATE = Path(__file__).resolve().parents[1] / "devices" / "mosquitto" / "mosquitto-certs.conf.template"
pytestmark = pytest.mark.mqtt


class CertPeer:
    """An MQTT 5 client logged in with a device's enrolled TLS certificate."""

    def __init__(self, url: str, folder: Path, client_id: str, subscribe=()) -> None:
        cfg = BrokerConfig.from_url(url, ca_file=str(folder / "ca.crt"), cert_file=str(folder / "tls.crt"),
                                    key_file=str(folder / "tls.key"))
        self.client = make_client(cfg, client_id)
        self.received: List[Tuple[str, bytes]] = []
        self.acks: Dict[int, object] = {}
        self.lock = threading.Lock()
        self.client.on_message = lambda c, u, m: self._add(self.received, (m.topic, bytes(m.payload)))
        self.client.on_publish = lambda c, u, mid, rc, props: self._ack(mid, rc)
        self.conn = Connection(cfg, self.client, on_connected=lambda c: [c.subscribe(t, qos=1) for t in subscribe])
        self.conn.start(timeout=10)

    def _add(self, target, item) -> None:
        with self.lock:
            target.append(item)

    def _ack(self, mid, rc) -> None:
        with self.lock:
            self.acks[mid] = rc

    def publish(self, topic: str, payload: bytes) -> str:
        """"Success" for any success code (no subscribers included), else the broker's reason."""
        info = self.client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with self.lock:
                if info.mid in self.acks:
                    rc = self.acks[info.mid]
                    return rc.getName() if rc.is_failure else "Success"
            time.sleep(0.01)
        raise AssertionError(f"no PUBACK for {topic}")

    def stop(self) -> None:
        self.conn.stop()


def test_enrolled_devices_are_confined_to_their_own_topics_of_their_own_federation(mosquitto_binary, tmp_path):
    state = tmp_path / "state"
    pki = FederationPKI(state, "lab")
    pki.ensure(("localhost", "127.0.0.1"))
    pi1 = pki.enroll("pi-1", tmp_path / "pi-1")
    pi2 = pki.enroll("pi-2", tmp_path / "pi-2")
    aggregator = tmp_path / "aggregator"
    aggregator.mkdir()
    for name, target in (("ca.crt", "ca.crt"), ("aggregator-tls.crt", "tls.crt"), ("aggregator-tls.key", "tls.key")):
        (aggregator / target).write_bytes((state / "pki" / name).read_bytes())
    port = free_port()
    rendered = TEMPLATE.read_text().replace("@STATE_DIR@", str(state)).replace("listener 8883",
                                                                               f"listener {port} 127.0.0.1")
    config = tmp_path / "mosquitto.conf"
    config.write_text("\n".join([*run_as_invoking_user(), "log_dest stderr", rendered]))
    broker = launch_mosquitto(config, "127.0.0.1", port)
    url = f"mqtts://127.0.0.1:{port}"
    peers = []
    try:
        agg = CertPeer(url, aggregator, "anything", subscribe=["flora/lab/update/+"])
        one = CertPeer(url, pi1, "pi-1", subscribe=["flora/lab/global", "flora/lab/secagg/inbox/pi-2"])
        two = CertPeer(url, pi2, "pi-2")
        peers += [agg, one, two]
        assert agg.publish("flora/lab/global", b"g") == "Success"
        assert one.publish("flora/lab/update/pi-1", b"u1") == "Success"
        assert one.publish("flora/lab/secagg/up/pi-1", b"s1") == "Success"
        for topic in ("flora/lab/update/pi-2", "flora/other/update/pi-1", "flora/lab/global", "flora/lab/round",
                      "flora/lab/secagg/stage", "flora/lab/secagg/inbox/pi-2"):
            assert one.publish(topic, b"forged") == "Not authorized", topic
        assert agg.publish("flora/lab/secagg/inbox/pi-2", b"for pi-2 only") == "Success"
        time.sleep(0.3)
        assert ("flora/lab/global", b"g") in one.received
        assert all(t != "flora/lab/secagg/inbox/pi-2" for t, _ in one.received)  # not its inbox: never read
        assert ("flora/lab/update/pi-1", b"u1") in agg.received
        pki.revoke("pi-2")
        os.kill(broker.process.pid, signal.SIGHUP)  # mosquitto re-reads the ACL
        time.sleep(0.5)
        assert two.publish("flora/lab/update/pi-2", b"after revoke") == "Not authorized"
        assert one.publish("flora/lab/update/pi-1", b"still fine") == "Success"
    finally:
        for p in peers:
            p.stop()
        broker.stop()


def test_the_certificate_listener_flora_sim_starts_is_the_templates(tmp_path):
    from flora.broker.mosquitto import certificate_listener

    def directives(lines):
        return {line.split()[0]: " ".join(line.split()[1:]) for line in lines
                if line.strip() and not line.startswith("#") and line.split()[0] not in ("listener",
                                                                                         "per_listener_settings",
                                                                                         "max_queued_messages")}

    rendered = TEMPLATE.read_text().replace("@STATE_DIR@", str(tmp_path)).splitlines()
    assert directives(certificate_listener(tmp_path)) == directives(rendered)
