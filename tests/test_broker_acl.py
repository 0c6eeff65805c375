"""devices/mosquitto/acl on a real mosquitto: a device writes only its own topics, never `global`."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import pytest

from broker.mosquitto import start_mosquitto
from edge.mqtt import BrokerConfig, Connection, make_client

from .conftest import REPO

pytestmark = pytest.mark.mqtt

USERS = {"flora-aggregator": "agg-secret", "dev-1": "one-secret", "dev-2": "two-secret"}


@pytest.fixture
def secured_broker(mosquitto_binary, tmp_path):
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    pw_file = tmp_path / "passwords"
    for i, (user, secret) in enumerate(USERS.items()):
        flags = ["-b", "-c"] if i == 0 else ["-b"]
        subprocess.run([passwd, *flags, str(pw_file), user, secret], check=True, capture_output=True)
    acl = tmp_path / "acl"
    shutil.copy(REPO / "devices" / "mosquitto" / "acl", acl)
    broker = start_mosquitto(tmp_path / "mq", listener_config=[
        "allow_anonymous false", f"password_file {pw_file}", f"acl_file {acl}"])
    yield broker
    broker.stop()


class Peer:
    def __init__(self, url: str, user: str, subscribe=()) -> None:
        cfg = BrokerConfig.from_url(url, username=user, password=USERS[user])
        self.client = make_client(cfg, user)
        self.received = []
        self.acks = {}
        self.lock = threading.Lock()
        self.client.on_message = lambda c, u, m: self.received.append((m.topic, bytes(m.payload)))
        self.client.on_publish = self._acked
        self.conn = Connection(cfg, self.client, on_connected=lambda c: [c.subscribe(t, qos=1) for t in subscribe])
        self.conn.start(timeout=10)

    def _acked(self, client, userdata, mid, reason_code, properties) -> None:
        with self.lock:
            self.acks[mid] = reason_code

    def publish(self, topic: str, payload: bytes):
        info = self.client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with self.lock:
                if info.mid in self.acks:
                    return self.acks[info.mid]
            time.sleep(0.02)
        raise AssertionError(f"no PUBACK for {topic}")


def test_a_device_may_write_only_its_own_topics(secured_broker):
    url = secured_broker.url
    aggregator = Peer(url, "flora-aggregator", subscribe=["flora/f/update/+", "flora/f/status/+"])
    dev2 = Peer(url, "dev-2", subscribe=["flora/f/global"])
    dev1 = Peer(url, "dev-1")
    try:
        assert not dev1.publish("flora/f/update/dev-1", b"mine").is_failure
        assert not dev1.publish("flora/f/status/dev-1", b"{}").is_failure
        denied = {t: dev1.publish(t, b"forged") for t in (
            "flora/f/update/dev-2", "flora/f/status/dev-2", "flora/f/metrics/dev-2", "flora/f/global",
            "flora/f/round")}
        assert not aggregator.publish("flora/f/global", b"the real global").is_failure
        time.sleep(0.5)
        for topic, code in denied.items():
            assert code.is_failure and code.getName() == "Not authorized", (topic, code)
        assert [t for t, _ in aggregator.received] == ["flora/f/update/dev-1", "flora/f/status/dev-1"]
        assert dev2.received == [("flora/f/global", b"the real global")]
    finally:
        for peer in (aggregator, dev1, dev2):
            peer.conn.stop()


def test_wrong_password_is_refused(secured_broker):
    cfg = BrokerConfig.from_url(secured_broker.url, username="dev-1", password="wrong")
    with pytest.raises(ConnectionError, match=r"Not authorized|Bad user name or password"):
        Connection(cfg, make_client(cfg, "dev-1")).start(timeout=3)


def make_certs(folder):
    """A private CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make test certificates")
    folder.mkdir()

    def run(*args):
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca.key", "-out", "ca.crt",
        "-subj", "/CN=flora-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-out", "server.crt", "-extfile", "san.ext")
    return folder


def test_tls_with_passwords_from_the_environment(mosquitto_binary, tiny_text_bundle, tmp_path, monkeypatch, capsys):
    certs = make_certs(tmp_path / "certs")
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([passwd, "-b", "-c", str(tmp_path / "pw"), "dev-1", "one-secret"], check=True)
    broker = start_mosquitto(tmp_path / "mq", listener_config=[
        "allow_anonymous false", f"password_file {tmp_path / 'pw'}", f"cafile {certs / 'ca.crt'}",
        f"certfile {certs / 'server.crt'}", f"keyfile {certs / 'server.key'}", "tls_version tlsv1.2"])
    try:
        from edge import cli

        monkeypatch.setenv("FLORA_MQTT_USERNAME", "dev-1")
        monkeypatch.setenv("FLORA_MQTT_PASSWORD", "one-secret")
        url = f"mqtts://127.0.0.1:{broker.port}"
        cfg = BrokerConfig.from_url(url, ca_file=str(certs / "ca.crt"))
        assert cfg.tls and cfg.username == "dev-1" and cfg.password == "one-secret"
        conn = Connection(cfg, make_client(cfg, "dev-1"))
        conn.start(timeout=10)
        conn.stop()
        # without the CA the server certificate is not trusted
        untrusted = BrokerConfig.from_url(url)
        with pytest.raises(ConnectionError):
            Connection(untrusted, make_client(untrusted, "dev-1")).start(timeout=3)
        # the agent's self-test checks the same connection
        assert cli.main(["doctor", "--broker", url, "--tls-ca", str(certs / "ca.crt"), "--bundle",
                         str(tiny_text_bundle.root)]) == 0
        out = capsys.readouterr().out
        assert f"OK    broker     mqtts://dev-1@127.0.0.1:{broker.port} accepted an MQTT 5 connection" in out
    finally:
        broker.stop()
