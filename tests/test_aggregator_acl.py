"""devices/mosquitto on a real mosquitto: passwords, the ACL (a device writes only its own topics, never
`global`), client-id takeover, a federation round through the ACL, and the TLS template."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from flora.broker.mosquitto import free_port, launch_mosquitto, run_as_invoking_user, start_mosquitto
from flora.edge import adapter
from flora.edge.mqtt import BrokerConfig, Connection, make_client
from flora.edge.protocol import RoundAnnouncement, Status
from flora.edge.synthetic import encode_update, random_adapter, synthetic_manifest, write_bundle

pytestmark = pytest.mark.mqtt
REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "devices" / "mosquitto"
USERS = {"flora-aggregator": "agg-secret", "dev-1": "one-secret", "dev-2": "two-secret"}


def password_file(path: Path) -> Path:
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not os.path.exists(passwd):
        pytest.skip("mosquitto_passwd is not installed (Debian: mosquitto)")
    for i, (user, secret) in enumerate(USERS.items()):
        flags = ["-b", "-c"] if i == 0 else ["-b"]
        subprocess.run([passwd, *flags, str(path), user, secret], check=True, capture_output=True)
    return path


@pytest.fixture
def secured_broker(mosquitto_binary, tmp_path):
    pw_file = password_file(tmp_path / "passwords")
    acl = shutil.copy(TEMPLATES / "acl", tmp_path / "acl")
    broker = start_mosquitto(tmp_path / "mq", listener_config=[
        "allow_anonymous false", f"password_file {pw_file}", f"acl_file {acl}", "use_username_as_clientid true"])
    yield broker
    broker.stop()


class Peer:
    """A paho MQTT 5 client logged in as one of USERS, recording what it receives and its PUBACK codes."""

    def __init__(self, url: str, user: str, subscribe=(), client_id: Optional[str] = None, **tls) -> None:
        cfg = BrokerConfig.from_url(url, username=user, password=USERS[user], **tls)
        self.client = make_client(cfg, client_id or user)
        self.received: List[Tuple[str, bytes]] = []
        self.acks: Dict[int, object] = {}
        self.disconnects = 0
        self.lock = threading.Lock()
        self.client.on_message = self._message
        self.client.on_publish = self._acked
        self.conn = Connection(cfg, self.client, on_connected=lambda c: [c.subscribe(t, qos=1) for t in subscribe])
        self.client.on_disconnect = self._disconnected
        self.conn.start(timeout=10)

    def _message(self, client, userdata, msg) -> None:
        with self.lock:
            self.received.append((msg.topic, bytes(msg.payload)))

    def _acked(self, client, userdata, mid, reason_code, properties) -> None:
        with self.lock:
            self.acks[mid] = reason_code

    def _disconnected(self, client, userdata, flags, reason_code, properties) -> None:
        with self.lock:
            self.disconnects += 1
        self.conn.connected.clear()

    def publish(self, topic: str, payload: bytes, retain: bool = False):
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with self.lock:
                if info.mid in self.acks:
                    return self.acks[info.mid]
            time.sleep(0.01)
        raise AssertionError(f"no PUBACK for {topic}")

    def topics(self) -> List[str]:
        with self.lock:
            return [t for t, _ in self.received]

    def stop(self) -> None:
        self.conn.stop()


def test_a_device_may_write_only_its_own_topics_and_read_only_global_and_round(secured_broker):
    url = secured_broker.url
    aggregator = Peer(url, "flora-aggregator", subscribe=["flora/f/update/+", "flora/f/status/+", "flora/f/metrics/+"])
    dev2 = Peer(url, "dev-2", subscribe=["flora/f/global", "flora/f/round", "flora/f/update/+", "flora/f/status/+"])
    dev1 = Peer(url, "dev-1")
    try:
        for topic in ("flora/f/update/dev-1", "flora/f/status/dev-1", "flora/f/metrics/dev-1"):
            assert not dev1.publish(topic, b"mine").is_failure, topic
        denied = {t: dev1.publish(t, b"forged") for t in (
            "flora/f/update/dev-2", "flora/f/status/dev-2", "flora/f/metrics/dev-2", "flora/f/global",
            "flora/f/round", "flora/f/update/flora-aggregator")}
        for topic, code in denied.items():
            assert code.is_failure and code.getName() == "Not authorized", (topic, code)
        assert not aggregator.publish("flora/f/global", b"the real global", retain=True).is_failure
        assert not aggregator.publish("flora/f/round", b"{}", retain=True).is_failure
        assert aggregator.publish("flora/f/update/dev-1", b"the aggregator is no device").is_failure
        time.sleep(0.3)
        # the aggregator got exactly dev-1's own messages; dev-2 got the aggregator's and none of dev-1's
        assert aggregator.topics() == ["flora/f/update/dev-1", "flora/f/status/dev-1", "flora/f/metrics/dev-1"]
        assert dev2.received == [("flora/f/global", b"the real global"), ("flora/f/round", b"{}")]
    finally:
        for peer in (aggregator, dev1, dev2):
            peer.stop()


def test_a_device_cannot_take_over_the_aggregators_session_by_its_client_id(secured_broker):
    aggregator = Peer(secured_broker.url, "flora-aggregator")
    impostor = Peer(secured_broker.url, "dev-1", client_id="flora-aggregator")
    try:
        time.sleep(0.3)
        assert aggregator.disconnects == 0 and aggregator.conn.connected.is_set()
        assert not aggregator.publish("flora/f/global", b"still here").is_failure
        assert impostor.publish("flora/f/global", b"forged").getName() == "Not authorized"
    finally:
        impostor.stop()
        aggregator.stop()


def test_wrong_or_missing_credentials_are_refused(secured_broker):
    for user, password in (("dev-1", "wrong"), ("nobody", "x"), (None, None)):
        cfg = BrokerConfig.from_url(secured_broker.url, username=user, password=password)
        with pytest.raises(ConnectionError, match=r"Not authorized|Bad user name or password"):
            Connection(cfg, make_client(cfg, user or "anonymous")).start(timeout=1)


def test_a_federation_round_runs_through_the_acl(secured_broker, tmp_path):
    m = synthetic_manifest()
    bundle = write_bundle(tmp_path / "bundle", m)
    fed = "acl-fed"
    device = Peer(secured_broker.url, "dev-1", subscribe=[f"flora/{fed}/global", f"flora/{fed}/round"])
    env = {**os.environ, "FLORA_MQTT_USERNAME": "flora-aggregator", "FLORA_MQTT_PASSWORD": USERS["flora-aggregator"],
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flora.broker.cli", "--bundle", str(bundle), "--broker",
                             secured_broker.url, "--federation", fed, "--rounds", "1", "--state-dir",
                             str(tmp_path / "agg"), "--wait-for-clients", "1", "--metrics-grace", "0"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        device.publish(f"flora/{fed}/status/dev-1", Status("dev-1", "online").to_json(), retain=True)
        deadline = time.monotonic() + 20
        while f"flora/{fed}/round" not in device.topics() and time.monotonic() < deadline:
            time.sleep(0.02)
        with device.lock:
            ann = RoundAnnouncement.from_json(dict(device.received)[f"flora/{fed}/round"])
        assert ann.round == 0 and ann.clients == ["dev-1"]
        update = encode_update(m, random_adapter(m, 3), "dev-1", 0, 8)
        assert not device.publish(f"flora/{fed}/update/dev-1", update).is_failure
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
        device.stop()
    with device.lock:
        globals_ = [adapter.decode(p) for t, p in device.received if t == f"flora/{fed}/global"]
        rounds = [RoundAnnouncement.from_json(p) for t, p in device.received if t == f"flora/{fed}/round"]
    assert [g.meta.round for g in globals_] == [0, 1] and rounds[-1].state == "done"
    for name, value in random_adapter(m, 3).items():
        assert (globals_[1].tensors[name] == value).all()  # one client: the global is its update


def make_certs(folder: Path) -> Path:
    """The README's CA and server certificate commands, for 127.0.0.1."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    folder.mkdir(parents=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-days", "2", "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=flora-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-out", "server.crt", "-extfile", "server.ext")
    return folder / "ca.crt"


def test_the_tls_template_serves_tls_only_with_passwords_and_the_acl(mosquitto_binary, tmp_path):
    config_dir = tmp_path / "flora"
    ca = make_certs(config_dir / "certs")
    password_file(config_dir / "passwords")
    shutil.copy(TEMPLATES / "acl", config_dir / "acl")
    template = (TEMPLATES / "mosquitto.conf.template").read_text()
    assert "listener 8883" in template and "@CONFIG_DIR@/certs/server.crt" in template
    port = free_port()
    rendered = template.replace("@CONFIG_DIR@", str(config_dir)).replace("listener 8883", f"listener {port} 127.0.0.1")
    config = tmp_path / "mosquitto.conf"
    config.write_text("\n".join([*run_as_invoking_user(), "log_dest stderr", rendered]))
    broker = launch_mosquitto(config, "127.0.0.1", port)
    try:
        url = f"mqtts://127.0.0.1:{port}"
        reader = Peer(url, "dev-2", subscribe=["flora/f/global"], ca_file=str(ca))
        aggregator = Peer(url, "flora-aggregator", ca_file=str(ca))
        assert not aggregator.publish("flora/f/global", b"over TLS").is_failure
        assert reader.publish("flora/f/global", b"forged").getName() == "Not authorized"
        time.sleep(0.2)
        assert reader.received == [("flora/f/global", b"over TLS")]
        reader.stop()
        aggregator.stop()
        plain = BrokerConfig.from_url(f"mqtt://127.0.0.1:{port}", username="dev-1", password=USERS["dev-1"])
        with pytest.raises(ConnectionError):
            Connection(plain, make_client(plain, "dev-1")).start(timeout=1)
    finally:
        broker.stop()
