"""TLS with a private CA and credentials from the environment, on the device side (BrokerConfig, `flora-agent doctor`).

The ACL, password file and TLS template of devices/mosquitto are tested in test_aggregator_acl.py.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from flora.broker.mosquitto import start_mosquitto
from flora.edge.mqtt import BrokerConfig, Connection, make_client

pytestmark = pytest.mark.mqtt


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
        from flora.edge import cli

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
        with pytest.raises(ConnectionError, match="TLS certificate verification failed"):
            Connection(untrusted, make_client(untrusted, "dev-1")).start(timeout=3)
        # the agent's self-test checks the same connection
        assert cli.main(["doctor", "--broker", url, "--tls-ca", str(certs / "ca.crt"), "--bundle",
                         str(tiny_text_bundle.root)]) == 0
        out = capsys.readouterr().out
        assert f"OK    broker     mqtts://dev-1@127.0.0.1:{broker.port} accepted an MQTT 5 connection" in out
    finally:
        broker.stop()


def test_an_interrupt_while_mosquitto_starts_up_stops_it(mosquitto_binary, tmp_path, monkeypatch):
    import flora.broker.mosquitto as mosquitto_module

    started = []

    def interrupted(broker, timeout):
        started.append(broker.process)
        raise KeyboardInterrupt  # Ctrl-C during the wait for the listener

    monkeypatch.setattr(mosquitto_module, "_wait_listening", interrupted)
    with pytest.raises(KeyboardInterrupt):
        start_mosquitto(tmp_path / "mosquitto")
    (process,) = started
    assert process.poll() is not None  # stopped, not left running
