"""Start a private mosquitto broker on a free loopback port (for flora-sim and the tests)."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from flora.edge.errors import EXIT_UNAVAILABLE, FloraError

INSTALL_HINT = "install it with `sudo apt-get install -y mosquitto` (Debian/Ubuntu/Raspberry Pi OS)"


class MosquittoError(FloraError, RuntimeError):
    """mosquitto is missing or did not start."""

    exit_code = EXIT_UNAVAILABLE


def find_mosquitto() -> str:
    """Path of the mosquitto binary (Debian puts it in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise MosquittoError(f"the mosquitto MQTT broker is not installed: {INSTALL_HINT}")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Mosquitto:
    host: str
    port: int
    process: subprocess.Popen
    config_path: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def __enter__(self) -> Mosquitto:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_mosquitto(
    workdir: Path,
    *,
    port: Optional[int] = None,
    host: str = "127.0.0.1",
    extra_config: Sequence[str] = (),
    listener_config: Optional[Sequence[str]] = None,
    timeout: float = 10.0,
) -> Mosquitto:
    """Write a config into `workdir`, start mosquitto on loopback, wait until it accepts connections.

    By default the listener allows anonymous clients (a private test/simulation broker bound to
    127.0.0.1); `listener_config` replaces that block (e.g. TLS, password file, ACL).
    """
    find_mosquitto()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    listener = list(listener_config) if listener_config is not None else ["allow_anonymous true"]
    lines = [
        *run_as_invoking_user(),
        "per_listener_settings false",
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "max_queued_messages 1000",
        f"listener {port} {host}",
        *listener,
        *extra_config,
    ]
    config_path = workdir / "mosquitto.conf"
    config_path.write_text("\n".join(lines) + "\n")
    return launch_mosquitto(config_path, host, port, timeout=timeout)


def certificate_listener(state_dir: Path) -> List[str]:
    """The listener settings of devices/mosquitto/mosquitto-certs.conf.template for the federation enrolled in
    `state_dir` (`flora-aggregator enroll`): TLS only, a certificate per device from the federation's CA, its
    CN as the username and client id, the enrollment ACL and CRL (give them as `start_mosquitto`'s
    `listener_config`; tests check they are the template's)."""
    pki = Path(state_dir) / "pki"
    return [
        "allow_anonymous false",
        f"acl_file {Path(state_dir) / 'mosquitto' / 'acl'}",
        "max_packet_size 67108864",
        "protocol mqtt",
        f"cafile {pki / 'ca.crt'}",
        f"certfile {pki / 'broker.crt'}",
        f"keyfile {pki / 'broker.key'}",
        f"crlfile {pki / 'crl.pem'}",
        "tls_version tlsv1.2",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
    ]


def run_as_invoking_user() -> Sequence[str]:
    """Config lines that keep a root-started mosquitto from dropping to the `mosquitto` user (which cannot
    read a private work dir's password and ACL files)."""
    return [f"user {getpass.getuser()}"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []


def _wait_listening(broker: Mosquitto, timeout: float) -> bool:
    """True once the broker accepts connections; False at the timeout; MosquittoError if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if broker.process.poll() is not None:
            raise MosquittoError(f"mosquitto exited with code {broker.process.returncode}:\n{broker.log_tail()}")
        try:
            with socket.create_connection((broker.host, broker.port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def launch_mosquitto(config_path: Path, host: str, port: int, *, timeout: float = 10.0) -> Mosquitto:
    """Start mosquitto with a ready config file (its listener on host:port); wait until it accepts connections.

    Its output goes to mosquitto.log beside the config.
    """
    binary = find_mosquitto()
    config_path = Path(config_path)
    log_path = config_path.parent / "mosquitto.log"
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen(
            [binary, "-c", str(config_path)], stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    broker = Mosquitto(host, port, proc, config_path, log_path)
    try:
        if _wait_listening(broker, timeout):
            return broker
    except BaseException:  # a Ctrl-C (or anything) while it starts up must not leave it running
        broker.stop()
        raise
    broker.stop()
    raise MosquittoError(f"mosquitto did not listen on {host}:{port} within {timeout}s:\n{broker.log_tail()}")
