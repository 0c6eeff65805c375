"""MQTT 5 connection settings shared by the agent and the aggregator (paho-mqtt 2.x)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Optional
from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .errors import EXIT_BAD_INPUT, EXIT_UNAVAILABLE, FloraError

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
PASSWORD_ENV = "FLORA_MQTT_PASSWORD"
USERNAME_ENV = "FLORA_MQTT_USERNAME"
DEFAULT_SESSION_EXPIRY_S = 3600


class BrokerConfigError(FloraError, ValueError):
    """The broker address or its credentials are unusable."""


class ConnectionFailed(FloraError, ConnectionError):
    """No connection to the broker within the timeout; the message says why (exit status 3: retrying may help)."""

    exit_code = EXIT_UNAVAILABLE


class NotAuthorised(FloraError, ConnectionError):
    """The broker refused these credentials or this client (exit status 2: a restart cannot fix it)."""

    exit_code = EXIT_BAD_INPUT


#: CONNACK reasons that retrying cannot fix (MQTT 5 reason codes 134, 135, 138 and 140).
NOT_AUTHORISED = ("Bad user name or password", "Not authorized", "Banned", "Bad authentication method")


def describe_socket_error(exc: OSError, cfg: BrokerConfig) -> str:
    """What a failed connect means, in words an operator can act on."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host {cfg.host!r} ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused: nothing listens on {cfg.host}:{cfg.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message or exc}"
    if isinstance(exc, ssl.SSLError):
        hint = " (is it a plain MQTT listener? then use mqtt://)" if cfg.tls else ""
        return f"TLS handshake failed: {exc.reason or exc}{hint}"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"timed out connecting to {cfg.host}:{cfg.port}"
    if isinstance(exc, ConnectionResetError) and cfg.tls:
        return f"connection reset during the TLS handshake (is {cfg.host}:{cfg.port} a plain MQTT listener?)"
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int
    tls: bool = False
    username: Optional[str] = None
    password: Optional[str] = None
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    keepalive: int = 30
    session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        username: Optional[str] = None,
        password: Optional[str] = None,
        ca_file: Optional[str] = None,
        cert_file: Optional[str] = None,
        key_file: Optional[str] = None,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
    ) -> BrokerConfig:
        """`mqtt://[user[:pass]@]host[:port]` or `mqtts://…`; the password may come from FLORA_MQTT_PASSWORD."""
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in DEFAULT_PORTS:
            raise BrokerConfigError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
        if not parsed.hostname:
            raise BrokerConfigError(f"broker URL {url!r} names no host")
        try:
            port = parsed.port or DEFAULT_PORTS[parsed.scheme]
        except ValueError as exc:
            raise BrokerConfigError(f"broker URL {url!r} has a bad port: {exc}") from exc
        user = username or (unquote(parsed.username) if parsed.username else None) or os.environ.get(USERNAME_ENV)
        pw = password or (unquote(parsed.password) if parsed.password else None) or os.environ.get(PASSWORD_ENV)
        tls = parsed.scheme == "mqtts" or ca_file is not None
        for what, path in (("CA file", ca_file), ("client certificate", cert_file), ("client key", key_file)):
            if path is not None and not os.path.isfile(path):
                raise BrokerConfigError(f"TLS {what} {path} does not exist")
        if (cert_file is None) != (key_file is None):
            raise BrokerConfigError("a TLS client certificate needs its key, and a key its certificate")
        if session_expiry_s < 0:
            raise BrokerConfigError(f"the MQTT session expiry must be >= 0 seconds, got {session_expiry_s}")
        return cls(parsed.hostname, port, tls, user, pw, ca_file, cert_file, key_file, 30, session_expiry_s)

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, session_expiry_s: Optional[int] = None) -> BrokerConfig:
        """The connection `add_connection_options` describes, from parsed (and config-merged) options.

        `session_expiry_s` overrides the option (the doctor's probe connection leaves no session behind).
        """
        if not args.broker:
            raise BrokerConfigError("missing --broker (on the command line or in --config)")
        return cls.from_url(
            str(args.broker), username=args.username, password=args.password, ca_file=_path_or_none(args.tls_ca),
            cert_file=_path_or_none(args.tls_cert), key_file=_path_or_none(args.tls_key),
            session_expiry_s=args.session_expiry_s if session_expiry_s is None else session_expiry_s,
        )

    def describe(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        who = f"{self.username}@" if self.username else ""
        return f"{scheme}://{who}{self.host}:{self.port}"


def _path_or_none(value) -> Optional[str]:
    return None if value is None else os.fspath(value)


def add_connection_options(parser, *, session_expiry: bool = True):
    """The broker options every tool that connects takes: --broker, credentials, TLS files and, unless
    the tool's connection is a short probe, --session-expiry-s. `parser` may be an argument group.
    `BrokerConfig.from_args` reads them back."""
    parser.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    parser.add_argument("--username", help=f"MQTT user (default: {USERNAME_ENV})")
    parser.add_argument("--password", help=f"MQTT password; prefer {PASSWORD_ENV} or the config file")
    parser.add_argument("--tls-ca", help="CA certificate file (turns TLS on)")
    parser.add_argument("--tls-cert", help="client certificate file (with --tls-key)")
    parser.add_argument("--tls-key", help="client key file")
    if session_expiry:
        parser.add_argument("--session-expiry-s", type=int, default=DEFAULT_SESSION_EXPIRY_S,
                            help="how long the broker keeps this client's session and queued messages while it "
                                 "is away (default %(default)s)")
    return parser


def from_others(qos: int = 1) -> SubscribeOptions:
    """Options of a subscription that leaves out this client's own publishes (MQTT 5 No Local): what arrives
    on it was published by someone else."""
    return SubscribeOptions(qos=qos, noLocal=True)


def make_client(
    cfg: BrokerConfig,
    client_id: str,
    *,
    will_topic: Optional[str] = None,
    will_payload: Optional[bytes] = None,
) -> mqtt.Client:
    """A paho MQTT 5 client with TLS, credentials, a retained last will and reconnect backoff."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password)
    if cfg.tls:
        client.tls_set(
            ca_certs=cfg.ca_file,
            certfile=cfg.cert_file,
            keyfile=cfg.key_file,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    if will_topic is not None:
        client.will_set(will_topic, will_payload, qos=1, retain=True)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client.max_queued_messages_set(0)
    return client


def connect_properties(cfg: BrokerConfig, max_packet_size: Optional[int] = None) -> Properties:
    """CONNECT's properties: the session expiry, and the Maximum Packet Size this client accepts (the broker
    then never sends it a larger packet)."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = cfg.session_expiry_s
    if max_packet_size is not None:
        props.MaximumPacketSize = max_packet_size
    return props


class Connection:
    """Connect with clean_start=False and a session expiry, so QoS 1 messages queued by the broker
    during a short disconnect are delivered on reconnect; paho's loop thread reconnects with backoff.

    `on_connected` runs on every (re)connection: subscribe there.
    """

    def __init__(self, cfg: BrokerConfig, client: mqtt.Client, on_connected=None,
                 max_packet_size: Optional[int] = None) -> None:
        self.cfg = cfg
        self.client = client
        self.max_packet_size = max_packet_size
        self.connected = threading.Event()
        self._on_connected = on_connected
        self.last_reason: Optional[str] = None
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect

    @property
    def refused(self) -> Optional[str]:
        """The reason of the broker's last refusal (a CONNACK failure), if any."""
        return self.last_reason

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_reason = str(reason_code)
            log.error("broker %s refused the connection: %s", self.cfg.describe(), reason_code)
            return
        session = "resumed" if getattr(flags, "session_present", False) else "new"
        log.info("connected to %s (%s session)", self.cfg.describe(), session)
        self.connected.set()
        if self._on_connected is not None:
            self._on_connected(client)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if reason_code != 0:
            log.warning("disconnected from %s: %s; reconnecting", self.cfg.describe(), reason_code)

    def start(self, timeout: float = 30.0) -> None:
        """Connect and start paho's network thread; raise if no connection within `timeout`.

        The first connection is made here, so its failure has a cause: ConnectionFailed names the socket or TLS
        error (refused, unresolvable, TLS against a plain listener...) or the broker's CONNACK reason, and
        NotAuthorised is raised at once for bad credentials or a denied client (retrying cannot fix those).
        Later disconnections are paho's to mend, with backoff.
        """
        deadline = time.monotonic() + timeout
        delay = 0.5
        while True:
            try:
                self.client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive, clean_start=False,
                                    properties=connect_properties(self.cfg, self.max_packet_size))
                break
            except OSError as exc:  # before ValueError: ssl.SSLCertVerificationError is both
                cause = describe_socket_error(exc, self.cfg)
                if time.monotonic() + delay > deadline:
                    raise ConnectionFailed(f"cannot connect to MQTT broker {self.cfg.describe()}: {cause} "
                                           f"(tried for {timeout:.0f} s)") from exc
                log.warning("cannot connect to %s: %s; retrying in %.1f s", self.cfg.describe(), cause, delay)
                time.sleep(delay)
                delay = min(2 * delay, 30.0)
            except ValueError as exc:
                raise BrokerConfigError(f"cannot connect to {self.cfg.describe()}: {exc}") from exc
        self.client.loop_start()
        while not self.connected.wait(0.05):
            refused = self.refused
            if refused is not None and refused in NOT_AUTHORISED:
                self.client.loop_stop()
                raise NotAuthorised(f"MQTT broker {self.cfg.describe()} refused the connection: {refused} (check "
                                    f"the username, password, client certificate and the broker's ACL)")
            if time.monotonic() > deadline:
                self.client.loop_stop()
                reason = f": the broker said {refused}" if refused else ": no CONNACK from the broker"
                raise ConnectionFailed(f"no connection to MQTT broker {self.cfg.describe()} within "
                                       f"{timeout:.0f}s{reason}")

    def stop(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
