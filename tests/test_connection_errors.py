"""A failed connection says why: refused, unresolvable, TLS against a plain listener, or not authorised (which
exits 2 at once, so systemd's RestartPreventExitStatus=2 stops a misconfigured device retrying for ever)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import pytest

from flora.broker.mosquitto import start_mosquitto
from flora.edge.mqtt import BrokerConfig, Connection, ConnectionFailed, NotAuthorised, make_client
from flora.edge.synthetic import synthetic_manifest, write_bundle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(url: str, timeout: float = 2.0, **kw) -> None:
    cfg = BrokerConfig.from_url(url, **kw)
    conn = Connection(cfg, make_client(cfg, "dev-1"))
    try:
        conn.start(timeout=timeout)
    finally:
        conn.client.loop_stop()


def test_a_refused_port_names_the_port():
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(ConnectionFailed, match=rf"connection refused: nothing listens on 127.0.0.1:{port}") as exc:
        connect(f"mqtt://127.0.0.1:{port}", timeout=1.5)
    assert exc.value.exit_code == 3 and time.monotonic() - t0 < 5


def test_an_unresolvable_host_says_so(monkeypatch):
    def unresolvable(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr("paho.mqtt.client.Client.connect", unresolvable)  # no DNS query leaves this machine
    with pytest.raises(ConnectionFailed, match=r"cannot resolve host 'broker.example' \(Name or service not known\)"):
        connect("mqtt://broker.example:1883", timeout=0.2)


@pytest.mark.mqtt
def test_tls_against_a_plain_listener_says_it_is_plain(mosquitto):
    with pytest.raises(ConnectionFailed) as exc:
        connect(f"mqtts://127.0.0.1:{mosquitto.port}", timeout=1.0)
    assert "TLS" in str(exc.value) and "plain MQTT listener" in str(exc.value)


@pytest.mark.mqtt
def test_bad_credentials_are_not_authorised_at_once_and_the_cli_exits_2(mosquitto_binary, tmp_path):
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([passwd, "-b", "-c", str(tmp_path / "pw"), "dev-1", "right"], check=True)
    broker = start_mosquitto(tmp_path / "mq", listener_config=["allow_anonymous false",
                                                                f"password_file {tmp_path / 'pw'}"])
    try:
        url = f"mqtt://127.0.0.1:{broker.port}"
        t0 = time.monotonic()
        with pytest.raises(NotAuthorised, match=r"refused the connection: (Not authorized|Bad user name or password)"):
            connect(url, timeout=20, username="dev-1", password="wrong")
        assert time.monotonic() - t0 < 5  # no waiting out the timeout
        connect(url, username="dev-1", password="right")  # the right password connects
        bundle = write_bundle(tmp_path / "bundle", synthetic_manifest())
        proc = subprocess.run([sys.executable, "-m", "flora.broker.cli", "--bundle", str(bundle), "--broker", url,
                               "--username", "dev-1", "--password", "wrong", "--state-dir", str(tmp_path / "agg")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "refused the connection" in proc.stderr
    finally:
        broker.stop()
