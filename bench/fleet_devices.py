"""Virtual devices for the fleet benchmark: thousands of MQTT connections in one process.

Each device is its own paho client (its own TCP connection, client id, persistent session and retained
status), driven by paho's external-loop API (`socket()`, `loop_read`, `loop_write`, `loop_misc`) from
one selector, so a process holds thousands of them without a thread each. A device behaves as
`flora-agent` does on the wire: retained `online` status at connect, subscriptions to `global` and
`round`, and when a round asks it and it holds the round's global: `training` status, a valid update
blob (QoS 1), its metrics and an `idle` status. Training takes no time here: the point is the broker and
the aggregator.

    python -m bench.fleet_devices --url mqtt://127.0.0.1:PORT --manifest M.json --first 0 --count 5000 \
        --dtype float16 --out result.json

Prints one JSON line `{"connected": n, "seconds": s}` once every device holds a session, then runs until
the federation says `done` (or --timeout), and writes what it sent, what the broker acknowledged and
what it downloaded into --out.

Copies of one message are parsed once per process (keyed by their length and a slice that differs
between messages: the round message's tail, the global's header), which is the harness's saving, not a
device's; the byte counts are every device's own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import selectors
import signal
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Deque, Dict, List, Optional, Set, Tuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from flora.edge.protocol import DOWNLINK_QOS

ROOT = Path(__file__).resolve().parents[1]
FEDERATION = "fleet"
ID_WIDTH = 5  # device ids dev00000..dev99999: one fixed width, so a template's header keeps its length
PLACEHOLDER = "dev" + "X" * ID_WIDTH
TEMPLATES = 4  # distinct update payloads (seeds); device i sends template i % TEMPLATES


def device_id(i: int) -> str:
    return f"dev{i:0{ID_WIDTH}d}"


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children, e.g. mosquitto, inherit it); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def template_samples(t: int) -> int:
    """num_samples of template t (the FedAvg weights the benchmark checks the global against)."""
    return 100 + t


class UpdateTemplates:
    """The update blobs of one round, one per template, with the client id patched in without re-encoding."""

    def __init__(self, manifest, dtype: str) -> None:
        from flora.edge.synthetic import random_adapter

        self.manifest = manifest
        self.dtype = dtype
        self.tensors = [random_adapter(manifest, seed, scale=0.01) for seed in range(TEMPLATES)]
        self._by_round: Dict[int, List[Tuple[bytes, int]]] = {}

    def blobs(self, round_: int) -> List[Tuple[bytes, int]]:
        if round_ not in self._by_round:
            from flora.edge.synthetic import encode_update

            self._by_round = {}  # one round at a time
            out = []
            for t, tensors in enumerate(self.tensors):
                blob = encode_update(self.manifest, tensors, PLACEHOLDER, round_, template_samples(t), dtype=self.dtype)
                out.append((blob, blob.index(PLACEHOLDER.encode())))
            self._by_round[round_] = out
        return self._by_round[round_]

    def blob(self, i: int, round_: int) -> bytes:
        template, pos = self.blobs(round_)[i % TEMPLATES]
        return template[:pos] + device_id(i).encode() + template[pos + len(PLACEHOLDER):]


@dataclass
class Round:
    number: int
    state: str
    global_sha256: str
    run_id: str
    ours: Set[int]  # our devices this round asks


@dataclass
class Device:
    index: int
    client: mqtt.Client
    connected: bool = False
    global_key: Optional[bytes] = None
    round_key: Optional[bytes] = None
    submitted: Set[int] = field(default_factory=set)
    update_mid: Optional[int] = None
    update_round: Optional[int] = None
    writing: bool = False
    bytes_global: int = 0
    bytes_round: int = 0
    globals_received: int = 0
    rounds_received: int = 0


def _round_key(payload: bytes) -> bytes:
    return len(payload).to_bytes(8, "little") + payload[-600:]


def _global_key(payload: bytes) -> bytes:
    if len(payload) < 8:
        return payload
    (n,) = struct.unpack("<Q", payload[:8])
    return payload[: 8 + min(n, 1 << 16)]


class Fleet:
    """`count` devices from index `first`, all in this process."""

    def __init__(self, url: str, first: int, count: int, templates: UpdateTemplates, window: int = 64,
                 qos_down: int = DOWNLINK_QOS, metrics: bool = True, max_updates: int = 0) -> None:
        from flora.edge.mqtt import BrokerConfig
        from flora.edge.protocol import Topics

        self.broker = BrokerConfig.from_url(url)
        self.topics = Topics(FEDERATION)
        self.templates = templates
        self.window = window
        self.qos_down = qos_down
        self.metrics = metrics
        self.max_updates = max_updates  # per device (0: one for every round or version that asks it)
        self.sel = selectors.DefaultSelector()
        self.devices = [self._device(i) for i in range(first, first + count)]
        self.by_index = {d.index: d for d in self.devices}
        self.rounds: Dict[bytes, Round] = {}
        self.globals: Dict[bytes, Tuple[int, str]] = {}  # key -> (round, sha256)
        self.queue: Deque[int] = deque()
        self.queued: Set[int] = set()
        self.in_flight = 0
        self.acked: Dict[int, List[str]] = {}  # round -> device ids whose update the broker acknowledged
        self.refused: List[str] = []
        self.published = 0
        self.done = False
        self.connect_s = 0.0

    def _device(self, i: int) -> Device:
        from flora.edge.protocol import Status

        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=device_id(i),
                             protocol=mqtt.MQTTv5, userdata=i)
        will = Status(device_id(i), "offline", ts=time.time()).to_json()
        client.will_set(self.topics.status(device_id(i)), will, qos=1, retain=True)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return Device(i, client)

    # -- paho callbacks (run inside loop_read / loop_write on this thread) ------------------------------
    def _on_connect(self, client, i, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            raise RuntimeError(f"{device_id(i)}: the broker refused the connection: {reason_code}")
        self.by_index[i].connected = True

    def _on_message(self, client, i, msg) -> None:
        d, payload = self.by_index[i], msg.payload
        if msg.topic == self.topics.global_:
            key = _global_key(payload)
            d.global_key = key
            d.bytes_global += len(payload)
            d.globals_received += 1
            if key not in self.globals:
                self.globals[key] = (_round_of(payload), hashlib.sha256(payload).hexdigest())
        elif msg.topic == self.topics.round:
            key = _round_key(payload)
            d.round_key, d.bytes_round = key, d.bytes_round + len(payload)
            d.rounds_received += 1
            if key not in self.rounds:
                self.rounds[key] = self._parse_round(payload)
                if self.rounds[key].state == "done":
                    self.done = True
        self._consider(d)

    def _parse_round(self, payload: bytes) -> Round:
        from flora.edge.protocol import RoundAnnouncement

        ann = RoundAnnouncement.from_json(payload)
        if ann.clients == "all":
            ours = set(self.by_index)
        else:
            ours = {i for i in map(_index_of, ann.clients) if i in self.by_index}
        return Round(ann.round, ann.state, ann.global_sha256, ann.run_id, ours)

    def _consider(self, d: Device) -> None:
        """Queue the device's update once a round asks it and it holds that round's global."""
        r = self.rounds.get(d.round_key) if d.round_key is not None else None
        if r is None or r.state != "training" or d.index not in r.ours or r.number in d.submitted:
            return
        if self.max_updates and len(d.submitted) >= self.max_updates:
            return
        g = self.globals.get(d.global_key) if d.global_key is not None else None
        if g is None or g[1] != r.global_sha256 or d.index in self.queued:
            return
        self.queue.append(d.index)
        self.queued.add(d.index)

    def _on_publish(self, client, i, mid, reason_code, properties) -> None:
        d = self.by_index[i]
        if mid != d.update_mid:
            return
        if reason_code is not None and reason_code.is_failure:
            self.refused.append(f"{device_id(i)}: {reason_code}")
        else:
            self.acked.setdefault(d.update_round, []).append(device_id(i))
        d.update_mid = None
        self.in_flight -= 1
        self._after_update(d)

    # -- publishing -----------------------------------------------------------------------------------------
    def _status(self, d: Device, state: str, round_: Optional[int]) -> None:
        from flora.edge.protocol import Status

        payload = Status(device_id(d.index), state, round_, None, template_samples(d.index % TEMPLATES), "fleet",
                         time.time()).to_json()  # declares the num_samples its updates carry
        d.client.publish(self.topics.status(device_id(d.index)), payload, qos=1, retain=True)

    def _send_update(self, d: Device) -> None:
        r = self.rounds[d.round_key]
        d.submitted.add(r.number)
        self._status(d, "training", r.number)
        info = d.client.publish(self.topics.update(device_id(d.index)), self.templates.blob(d.index, r.number), qos=1)
        d.update_mid, d.update_round = info.mid, r.number
        self.in_flight += 1
        self.published += 1

    def _after_update(self, d: Device) -> None:
        if self.metrics:
            from flora.edge.protocol import Metrics

            m = Metrics(device_id(d.index), d.update_round, 0.5, 0.5, 0.5, 100, 4, 1, 0.0, 0.0, 0.0, "fleet")
            d.client.publish(self.topics.metrics(device_id(d.index)), m.to_json(), qos=1)
        self._status(d, "idle", d.update_round)

    # -- the loop -------------------------------------------------------------------------------------------------
    def _service(self, d: Device) -> None:
        """Keep the selector's interest in step with what paho has to write."""
        sock = d.client.socket()
        if sock is None:
            return
        want = d.client.want_write()
        if want != d.writing:
            self.sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0), d)
            d.writing = want

    def _poll(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            d: Device = key.data
            if mask & selectors.EVENT_READ:
                rc = d.client.loop_read(max_packets=16)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    raise RuntimeError(f"{device_id(d.index)} lost its connection: {mqtt.error_string(rc)}")
            if mask & selectors.EVENT_WRITE:
                d.client.loop_write()
            self._service(d)

    def connect(self, pending_max: int = 256, timeout: float = 300.0) -> float:
        """Connect every device (at most `pending_max` awaiting their CONNACK); subscribe; seconds taken."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        t0 = time.monotonic()
        todo = deque(self.devices)
        waiting: List[Device] = []
        while todo or waiting:
            while todo and len(waiting) < pending_max:
                d = todo.popleft()
                d.client.connect(self.broker.host, self.broker.port, keepalive=600, clean_start=False,
                                 properties=props)
                d.client.socket().setblocking(False)
                self.sel.register(d.client.socket(), selectors.EVENT_READ, d)
                self._service(d)
                waiting.append(d)
            self._poll(0.05)
            for d in [d for d in waiting if d.connected]:
                d.client.subscribe([(self.topics.global_, self.qos_down), (self.topics.round, self.qos_down)])
                self._status(d, "online", None)
                self._service(d)
            waiting = [d for d in waiting if not d.connected]
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{len(waiting) + len(todo)} devices not connected after {timeout:.0f} s")
        self.connect_s = time.monotonic() - t0
        return self.connect_s

    def run(self, timeout: float) -> None:
        """Serve rounds until the federation is done (and every update in flight is acknowledged)."""
        deadline, next_misc = time.monotonic() + timeout, time.monotonic() + 5
        while not (self.done and self.in_flight == 0):
            while self.queue and self.in_flight < self.window:
                i = self.queue.popleft()
                self.queued.discard(i)
                d = self.by_index[i]
                self._send_update(d)
                self._service(d)
            self._poll(0.05)
            now = time.monotonic()
            if now >= next_misc:
                for d in self.devices:
                    d.client.loop_misc()
                    self._service(d)
                next_misc = now + 5
            if now > deadline:
                raise TimeoutError(f"the federation was not done after {timeout:.0f} s")

    def close(self) -> None:
        for d in self.devices:
            if d.client.socket() is not None:
                self._status(d, "offline", None)
                d.client.disconnect()
                with _quiet():
                    d.client.loop_write()

    def missing(self) -> Dict[str, List[str]]:
        """Devices a round asked that never sent for it, by why (a harness check: all lists stay empty)."""
        out: Dict[str, List[str]] = {}
        for r in self.rounds.values():
            if r.state != "training":
                continue
            for i in sorted(r.ours):
                d = self.by_index[i]
                if r.number in d.submitted:
                    continue
                g = self.globals.get(d.global_key) if d.global_key is not None else None
                why = ("queued" if i in self.queued else "no-round" if d.round_key is None else
                       "newer-round" if self.rounds[d.round_key].number != r.number else
                       "no-global" if g is None else "global-mismatch" if g[1] != r.global_sha256 else "?")
                out.setdefault(f"round {r.number}: {why}", []).append(device_id(i))
        return out

    def result(self) -> Dict:
        return {
            "missing": {k: v[:20] for k, v in self.missing().items()},
            "in_flight": self.in_flight, "queued": len(self.queue),
            "devices": len(self.devices), "connect_s": round(self.connect_s, 3), "published": self.published,
            "acked": {str(r): ids for r, ids in sorted(self.acked.items())}, "refused": self.refused[:20],
            "bytes_global": sum(d.bytes_global for d in self.devices),
            "bytes_round": sum(d.bytes_round for d in self.devices),
            "globals_received": sum(d.globals_received for d in self.devices),
            "rounds_received": sum(d.rounds_received for d in self.devices),
            "peak_rss_mib": round(peak_rss_mib(), 1), "cpu_s": round(cpu_seconds(), 1),
        }


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)


def _index_of(client: str) -> Optional[int]:
    if len(client) == 3 + ID_WIDTH and client.startswith("dev") and client[3:].isdigit():
        return int(client[3:])
    return None


def _round_of(blob: bytes) -> int:
    from flora.edge import adapter

    try:
        return int(adapter.read_header(blob)[1].get("round", -1))
    except (adapter.AdapterError, ValueError):
        return -1


def cpu_seconds(pid: str = "self") -> float:
    """User + system CPU time of a process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def peak_rss_mib(pid: str = "self") -> float:
    """VmHWM of a process (MiB), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _stop(signum, frame) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--window", type=int, default=64, help="updates in flight at once (this process)")
    p.add_argument("--qos-down", type=int, default=DOWNLINK_QOS, choices=[0, 1],
                   help="subscription QoS of global and round (default: the agent's)")
    p.add_argument("--no-metrics", action="store_true", help="send no metrics message after each update")
    p.add_argument("--max-updates", type=int, default=0, help="updates per device at most (0: no limit)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from flora.edge.bundle import load_manifest

    raise_fd_limit()
    manifest = load_manifest(args.manifest)
    fleet = Fleet(args.url, args.first, args.count, UpdateTemplates(manifest, args.dtype), args.window,
                  args.qos_down, not args.no_metrics, args.max_updates)
    signal.signal(signal.SIGTERM, _stop)
    fleet.connect()
    print(json.dumps({"connected": args.count, "seconds": round(fleet.connect_s, 3)}), flush=True)
    try:
        fleet.run(args.timeout)
    finally:
        args.out.write_text(json.dumps(fleet.result()))
        fleet.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
