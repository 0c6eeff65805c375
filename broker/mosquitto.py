"""Start a private mosquitto broker on a free loopback port (for flora-sim and the tests), and size any
mosquitto's queues for a federation (`queue_limits`).

The private broker requires a generated username and password (anonymous clients are refused), so
another local user cannot forge `global` or `round` messages, take over the aggregator's session or
add ghost devices; clients get the credentials from the environment (`Mosquitto.env`:
FLORA_MQTT_USERNAME, FLORA_MQTT_PASSWORD), never from a command line other users can read.
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

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


#: The generated user of a private broker.
USERNAME = "flora"
#: What one device puts through the aggregator's session in a round: its update, metrics, two statuses, and
#: room for re-sends and retries.
MESSAGES_PER_DEVICE = 8


def queue_limits(clients: int, max_update_bytes: int) -> List[str]:
    """mosquitto config lines that let the aggregator's session hold a whole round unread for a federation of
    `clients` devices whose updates are at most `max_update_bytes` (mosquitto 2.0's limits apply to every
    session; only the aggregator's ever fills, devices read two retained messages). Past these limits
    mosquitto drops messages it already acknowledged to their senders, so they are sized for the
    federation, twice over, instead of the default 1,000 messages; `max_packet_size` refuses (disconnects)
    a client that sends a packet larger than any valid update or announcement."""
    if clients < 1 or max_update_bytes < 1:
        raise ValueError(f"queue_limits needs clients >= 1 and max_update_bytes >= 1, got {clients}, "
                         f"{max_update_bytes}")
    messages = MESSAGES_PER_DEVICE * clients + 1000
    queued_bytes = 2 * clients * (max_update_bytes + 16384)
    announcement = 80 * clients + 65536  # the round message names every asked client
    return [f"max_queued_messages {messages}", f"max_queued_bytes {queued_bytes}",
            f"max_packet_size {max(max_update_bytes, announcement) + 65536}"]


#: What start_mosquitto sizes its private broker for unless told otherwise (tests, a simulation).
DEFAULT_CLIENTS = 10_000
DEFAULT_MAX_UPDATE_BYTES = 4 << 20


@dataclass
class Mosquitto:
    host: str
    port: int
    process: subprocess.Popen
    config_path: Path
    log_path: Path
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def env(self) -> Dict[str, str]:
        """The environment that gives a flora client (or a child process) this broker's credentials."""
        from flora.edge.mqtt import PASSWORD_ENV, USERNAME_ENV

        if self.username is None:
            return {}
        return {USERNAME_ENV: self.username, PASSWORD_ENV: self.password or ""}

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
    clients: int = DEFAULT_CLIENTS,
    max_update_bytes: int = DEFAULT_MAX_UPDATE_BYTES,
    anonymous: bool = False,
) -> Mosquitto:
    """Write a config into `workdir`, start mosquitto on loopback, wait until it accepts connections.

    By default the listener requires a generated username and password (`Mosquitto.env` holds them;
    `anonymous=True` allows anonymous clients instead); `listener_config` replaces that block (e.g. TLS,
    a password file and ACL of the caller's). The queues are sized for `clients` devices sending updates of
    at most `max_update_bytes` (`queue_limits`); `extra_config` lines come last and win.
    """
    find_mosquitto()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    username = password = None
    if listener_config is not None:
        listener = list(listener_config)
    elif anonymous:
        listener = ["allow_anonymous true"]
    else:
        username, password = USERNAME, secrets.token_urlsafe(24)
        listener = ["allow_anonymous false", f"password_file {write_password_file(workdir, username, password)}"]
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
        *queue_limits(clients, max_update_bytes),
        f"listener {port} {host}",
        *listener,
        *extra_config,
    ]
    config_path = workdir / "mosquitto.conf"
    config_path.write_text("\n".join(lines) + "\n")
    broker = launch_mosquitto(config_path, host, port, timeout=timeout)
    broker.username, broker.password = username, password
    return broker


def write_password_file(workdir: Path, username: str, password: str) -> Path:
    """A mosquitto password file (mode 600) with one user, hashed by mosquitto_passwd."""
    path = Path(workdir) / "passwords"
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    tool = shutil.which("mosquitto_passwd") or shutil.which("mosquitto_passwd", path="/usr/bin:/usr/sbin")
    if not tool:
        raise MosquittoError(f"mosquitto_passwd is missing (it comes with mosquitto): {INSTALL_HINT}")
    proc = subprocess.run([tool, "-b", str(path), username, password], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise MosquittoError(f"mosquitto_passwd failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return path


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
