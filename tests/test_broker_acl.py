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
