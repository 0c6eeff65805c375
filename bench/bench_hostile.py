"""Hostile devices and lossy brokers against the real aggregator: what crashes, what is lost, what is counted twice.

    python bench/bench_hostile.py --label after            # this checkout
    /path/to/old/.venv/bin/python bench/bench_hostile.py --label before   # another checkout's flora, same harness

The harness uses only what every version of the project has (the CLIs, `flora.broker.mosquitto`,
`flora.edge.synthetic`, the protocol's dataclasses and the Aggregator's event methods), so one script
measures a checkout before and after a change. Scenarios (each bounded in count and time, loopback only):

- `parsers`: a seeded corpus of adversarial and random payloads (deep nesting, 1e400, Infinity, NaN,
  5,000-digit integers, duplicate keys, lone surrogates, wrong types, unknown and missing keys, byte flips,
  truncations) at every parser of network input: round, status, metrics, the update validator. A crash is
  any exception other than the parser's own rejection type.
- `aggregator-events`: the same corpus as status, metrics and update messages (and updates on topics whose
  id is outside the grammar) through the aggregator's own event handling, in a round and out of one. A
  crash is an exception out of the event loop (the process would die before acknowledging, and the broker
  would redeliver: a crash loop); an update lost is one acknowledged but counted nowhere.
- `live-retained-status`, `live-update-header`: the real `flora-aggregator` on a private mosquitto, two
  honest scripted devices and one hostile device; the federation must finish its rounds. A crash is
  followed by one restart (the broker redelivers what killed it).
- `kill-in-commit`: a process killed inside the checkpoint commit (after the new global is written, before
  state.json names it; after state.json, before the old global is deleted); leftovers after `load()`.
- `flipped-bundle`: one flipped bit in the bundle's adapter.safetensors: published as the round-0 global?
- `metrics-growth`: a 20 MB metrics string and a NaN evaluation: state.json growth and strict JSON.

Writes bench/results/hostile-<label>.json and .md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import multiprocessing
import os
import platform
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FED = "hostile"


# -- the corpus (seeded, identical for every version) ----------------------------------------------------
def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


HOSTILE_VALUES = [
    "1e400", "-1e400", "Infinity", "-Infinity", "NaN", "9" * 5000, "-" + "9" * 30, "true", "false", "null",
    '"\\ud800"', '"x"', '""', "[]", "{}", "0", "-1", "1.5", "3.0", "1e308", str(2 ** 64), '"' + "y" * 3000 + '"',
    nested(1000), nested(50), '{"a":' * 800 + "1" + "}" * 800, '[' + ",".join(["1"] * 3000) + ']', '"c1\\n"',
    '{"a": 1, "a": 2}', '"' + "\\u0000" * 10 + '"',
]
ADVERSARIAL = [
    nested(1000), nested(100_000), '{"a":' * 5000 + "1" + "}" * 5000, '{"round": 1e400}', '{"round": Infinity}',
    '{"round": NaN}', '{"round": ' + "9" * 5000 + "}", '{"round": 1, "round": 2}', '{"round": "\\ud800"}', "", "null",
    "[]", "1", '"x"', "{", "\xff\xfe{}",
]


def _object_text(d: Dict[str, str]) -> str:
    """JSON object text from key -> raw value text (so non-standard tokens survive)."""
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in d.items()) + "}"


def json_corpus(valid: Dict[str, Any], n: int, rng: random.Random) -> List[bytes]:
    """ADVERSARIAL plus `n` mutations of a valid message: a field replaced, removed or added, raw bytes."""
    base = {k: json.dumps(v) for k, v in valid.items()}
    out = [a.encode("utf-8", "surrogatepass") for a in ADVERSARIAL]
    for _ in range(n):
        op = rng.randrange(5)
        d = dict(base)
        key = rng.choice(sorted(d))
        if op <= 1:
            d[key] = rng.choice(HOSTILE_VALUES)
        elif op == 2:
            d.pop(key)
        elif op == 3:
            d[f"x_{rng.randrange(100)}"] = rng.choice(HOSTILE_VALUES)
        else:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
            continue
        out.append(_object_text(d).encode("utf-8", "surrogatepass"))
    return out


def update_corpus(good: bytes, n: int, rng: random.Random) -> List[bytes]:
    """Blobs whose safetensors header is adversarial JSON, a mutated header, flipped bytes or a truncation."""
    (hlen,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + hlen])
    data = good[8 + hlen:]
    first = next(k for k in header if k != "__metadata__")

    def blob(text: str) -> bytes:
        raw = text.encode("utf-8", "surrogatepass")
        return struct.pack("<Q", len(raw)) + raw + data

    out = [blob(a) for a in ADVERSARIAL]
    for _ in range(n):
        op = rng.randrange(5)
        meta = {k: json.dumps(v) for k, v in header["__metadata__"].items()}
        entry = {k: json.dumps(v) for k, v in header[first].items()}
        if op == 0:
            meta[rng.choice([*sorted(meta), "num_samples", "round"])] = rng.choice(HOSTILE_VALUES)
        elif op == 1:
            entry[rng.choice(["shape", "data_offsets", "dtype", "extra"])] = rng.choice(HOSTILE_VALUES)
        if op <= 1:
            top = {k: json.dumps(v) for k, v in header.items() if k not in ("__metadata__", first)}
            out.append(blob(_object_text({"__metadata__": _object_text(meta), first: _object_text(entry), **top})))
        elif op == 2:
            b = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(8 + hlen)] = rng.randrange(256)
            out.append(bytes(b))
        elif op == 3:
            out.append(good[: rng.randrange(len(good))])
        else:
            out.append(blob(rng.choice(HOSTILE_VALUES)))
    return out


# -- helpers ---------------------------------------------------------------------------------------------
def _manifest():
    from flora.edge.synthetic import synthetic_manifest
    return synthetic_manifest(blocks=2, width=16, rank=4)


def _good_messages(m) -> Dict[str, Dict[str, Any]]:
    from flora.edge.protocol import Metrics, RoundAnnouncement, Status, TrainConfig
    rnd = RoundAnnouncement(round=0, model_id=m.model_id, state="training", config=TrainConfig(), clients=["a"],
                            deadline=1.7e9, global_sha256="ab" * 32, total_rounds=2, run_id="00ff00ff00ff00ff")
    return {"round": json.loads(rnd.to_json()), "status": json.loads(Status("a", "online").to_json()),
            "metrics": json.loads(Metrics("a", 0, 0.5, 0.5, None, 10, 2, 1, 1.0, 0.1, 100.0, "step").to_json())}


def _count(parse: Callable[[bytes], Any], payloads: Sequence[bytes], allowed: Tuple[type, ...]) -> Dict[str, Any]:
    tried = rejected = crashed = 0
    kinds: Dict[str, int] = {}
    for p in payloads:
        tried += 1
        try:
            parse(p)
        except allowed:
            rejected += 1
        except Exception as exc:  # what this harness measures: an exception the caller does not expect
            crashed += 1
            kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
    return {"tried": tried, "rejected": rejected, "crashed": crashed, "crash_types": kinds}


# -- scenarios ---------------------------------------------------------------------------------------------
def scenario_parsers(n: int, seed: int) -> Dict[str, Any]:
    from flora.broker.validation import Rejected, RoundView, validate_update
    from flora.edge import adapter
    from flora.edge.protocol import Metrics, ProtocolError, RoundAnnouncement, Status
    from flora.edge.synthetic import encode_update, random_adapter

    m = _manifest()
    rng = random.Random(seed)
    good = _good_messages(m)
    limit = adapter.max_blob_bytes(m.trainable)
    parsers = {
        "round": (RoundAnnouncement.from_json, json_corpus(good["round"], n, rng), (ProtocolError,)),
        "status": (Status.from_json, json_corpus(good["status"], n, rng), (ProtocolError,)),
        "metrics": (Metrics.from_json, json_corpus(good["metrics"], n, rng), (ProtocolError,)),
        "update": (lambda b: validate_update(b, "a", m, RoundView(0, {"a"}, set()), limit),
                   update_corpus(encode_update(m, random_adapter(m, 1), "a", 0, 10), n, rng), (Rejected,)),
        "global": (lambda b: adapter.decode(b, m.trainable, model_id=m.model_id, max_bytes=limit),
                   update_corpus(adapter.encode(random_adapter(m, 1), model_id=m.model_id, round=0, kind="global"),
                                 n, rng), (adapter.AdapterError,)),
    }
    per = {name: _count(parse, payloads, allowed) for name, (parse, payloads, allowed) in parsers.items()}
    total = {k: sum(p[k] for p in per.values()) for k in ("tried", "rejected", "crashed")}
    return {**total, "per_parser": per}


class _Acks:
    def __init__(self) -> None:
        self.mids: List[int] = []

    def ack(self, mid: int, qos: int) -> int:
        self.mids.append(mid)
        return 0

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False):
        return SimpleNamespace(mid=0, is_published=lambda: True, rc=0, wait_for_publish=lambda timeout=None: None)

    def manual_ack_set(self, on: bool) -> None:
        pass


def _broker_arg(url: str):
    """AggregatorConfig's broker: a URL in older versions, a BrokerConfig since they share BrokerConfig.from_args."""
    from flora.edge import mqtt
    return mqtt.BrokerConfig.from_url(url) if hasattr(mqtt.BrokerConfig, "from_args") else url


def _offline_aggregator(state_dir: Path, **kw):
    from flora.broker.aggregator import Aggregator, AggregatorConfig
    from flora.broker.rounds import Sampling
    from flora.edge.synthetic import random_adapter

    m = _manifest()
    cfg = AggregatorConfig(manifest=m, initial_adapter=random_adapter(m, 0), broker=_broker_arg("mqtt://127.0.0.1:1"),
                           state_dir=state_dir, rounds=2, federation=FED, sampling=Sampling(min_clients=1), **kw)
    if "client" in inspect.signature(Aggregator.__init__).parameters:  # since it takes its MQTT client
        agg = Aggregator(cfg, _Acks())
    else:
        agg = Aggregator(cfg)
        agg.client = _Acks()
    agg._resume_or_start()
    agg.connections = 1
    return agg


def _rejections(agg) -> int:
    if agg.current is not None:
        return sum(agg.current.rejection_counts.values())
    nr = agg.no_round
    return 0 if nr is None else nr.count + sum(getattr(nr, "counts", {}).values())


def scenario_aggregator_events(n: int, seed: int, work: Path) -> Dict[str, Any]:
    from flora.edge.protocol import Status
    from flora.edge.synthetic import encode_update, random_adapter

    m = _manifest()
    rng = random.Random(seed)
    good = _good_messages(m)
    statuses = json_corpus(good["status"], n, rng)
    metrics = json_corpus(good["metrics"], n, rng)
    updates = update_corpus(encode_update(m, random_adapter(m, 1), "a", 0, 10), n, rng)
    bad_ids = ["x" * 65, "a\n", "a+b", "é", "a b"]
    tried = rejected = crashed = lost = 0
    kinds: Dict[str, int] = {}
    for opened in (False, True):
        agg = _offline_aggregator(work / f"events-{opened}")
        if opened:
            agg.handle("status", "a", Status("a", "online").to_json())
            agg._open_round()
        mid = 0
        messages = [("status/a", p) for p in statuses] + [("metrics/a", p) for p in metrics] + \
                   [("update/a", p) for p in updates] + \
                   [(f"update/{b}", encode_update(m, random_adapter(m, 2), "a", 0, 5)) for b in bad_ids]
        for tail, payload in messages:
            mid += 1
            tried += 1
            before_acks, before_rej = len(agg.client.mids), _rejections(agg)
            msg = SimpleNamespace(topic=f"flora/{FED}/{tail}", payload=payload, mid=mid, qos=1)
            try:
                agg._on_message(agg.client, None, msg)
                agg._drain(0)
            except Exception as exc:  # the process would die here, before the ack: redelivered on restart
                crashed += 1
                kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
                agg = _offline_aggregator(work / f"events-{opened}")  # "restart" (the message is redelivered...)
                if opened and agg.current is None:
                    agg.handle("status", "a", Status("a", "online").to_json())
                    agg._open_round()
                continue
            rejected += 1
            if tail.startswith("update/") and mid in agg.client.mids[before_acks:] and _rejections(agg) == before_rej:
                lost += 1  # acknowledged, counted nowhere
    return {"tried": tried, "rejected": rejected, "crashed": crashed, "crash_types": kinds, "updates_lost": lost}


class _Devices:
    """One MQTT connection playing honest devices (scripted: they submit fixed updates) and a hostile one."""

    def __init__(self, url: str, m, clients: Sequence[str]) -> None:
        from flora.edge.mqtt import BrokerConfig, Connection, make_client
        from flora.edge.protocol import Topics

        self.m, self.clients, self.topics = m, list(clients), Topics(FED)
        self.rounds: Dict[int, Any] = {}
        self.done = threading.Event()
        self.global_seen = threading.Event()  # the aggregator has connected and subscribed
        self.lock = threading.Lock()
        cfg = BrokerConfig.from_url(url)
        self.client = make_client(cfg, f"devices-{os.getpid()}")
        self.client.on_message = self._on_message
        self.conn = Connection(cfg, self.client, on_connected=lambda c: c.subscribe([(self.topics.round, 1),
                                                                                      (self.topics.global_, 1)]))
        self.conn.start(timeout=10)
        self.sent: Dict[Tuple[int, str], int] = {}

    def _on_message(self, client, userdata, msg) -> None:
        from flora.edge.protocol import RoundAnnouncement
        if msg.topic == self.topics.global_:
            self.global_seen.set()
            return
        try:
            r = RoundAnnouncement.from_json(bytes(msg.payload))
        except Exception:
            return
        with self.lock:
            self.rounds[r.round] = r
            if r.state == "done":
                self.done.set()

    def pub(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def online(self) -> None:
        from flora.edge.protocol import Status
        for c in self.clients:
            self.pub(self.topics.status(c), Status(c, "online").to_json(), retain=True)

    def play(self, deadline: float) -> None:
        """Submit each asked client's update once per round until `done` or the deadline."""
        from flora.edge.synthetic import encode_update, random_adapter
        while not self.done.is_set() and time.monotonic() < deadline:
            with self.lock:
                pending = [r for r in self.rounds.values() if r.state == "training"]
            for r in pending:
                for c in self.clients:
                    if (r.round, c) not in self.sent and r.asks(c):
                        self.pub(self.topics.update(c), encode_update(self.m, random_adapter(self.m, r.round), c,
                                                                      r.round, 10))
                        self.sent[(r.round, c)] = 10
            time.sleep(0.05)

    def stop(self) -> None:
        self.conn.stop()


def _start_aggregator(bundle: Path, url: str, state: Path, log: Path, rounds: int,
                      extra: Sequence[str] = ()) -> subprocess.Popen:
    args = [sys.executable, "-m", "flora.broker.cli", "--bundle", str(bundle), "--broker", url, "--federation", FED,
            "--rounds", str(rounds), "--state-dir", str(state), "--min-clients", "2", "--round-timeout", "5",
            "--metrics-grace", "0", *extra]
    return subprocess.Popen(args, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def _history(state: Path) -> List[Dict[str, Any]]:
    path = state / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def scenario_live(hostile: str, work: Path, rounds: int = 2, timeout: float = 60.0) -> Dict[str, Any]:
    """The CLI with two honest devices and one hostile message (`retained-status` or `update-header`)."""
    from flora.broker.mosquitto import start_mosquitto
    from flora.edge.synthetic import write_bundle

    m = _manifest()
    work.mkdir(parents=True, exist_ok=True)
    bundle = write_bundle(work / "bundle", m)
    broker = start_mosquitto(work / "mosquitto")
    os.environ.update(getattr(broker, "env", {}))  # a generated password, where the version under test has one
    state, log = work / "state", work / "aggregator.log"
    devices = _Devices(broker.url, m, ["h1", "h2"])
    crashes, restarts = 0, 0
    try:
        evil = devices.topics
        if hostile == "retained-status":
            devices.pub(evil.status("evil"), nested(1000).encode(), retain=True)
        devices.online()
        proc = _start_aggregator(bundle, broker.url, state, log, rounds)
        if hostile == "update-header":
            devices.global_seen.wait(30)  # subscribed: the broker now keeps what comes for its session
            raw = nested(1000).encode()
            devices.pub(evil.update("evil"), struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
            big = b'{"__metadata__": {"num_samples": "' + b"9" * 5000 + b'"}}'
            devices.pub(evil.update("evil"), struct.pack("<Q", len(big)) + big)
        deadline = time.monotonic() + timeout
        player = threading.Thread(target=devices.play, args=(deadline,), daemon=True)
        player.start()
        while time.monotonic() < deadline and not devices.done.is_set():
            if proc.poll() is not None:
                crashes += 1
                if restarts >= 2:
                    break
                restarts += 1
                proc = _start_aggregator(bundle, broker.url, state, log, rounds)
            time.sleep(0.1)
        finished = devices.done.is_set()
        player.join(5)
        alive = proc.poll() is None
        if alive:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        rows = _history(state)
        averaged = sum(len(r.get("reported", {})) for r in rows)
        sent = sum(1 for (rnd, _c) in devices.sent if rnd < rounds)
        return {"tried": 1 if hostile == "retained-status" else 2, "crashed": crashes, "restarts": restarts,
                "finished": finished, "rounds_done": len(rows), "rounds_lost": rounds - len(rows),
                "honest_sent": sent, "honest_averaged": averaged, "updates_lost": max(0, sent - averaged),
                "double_counted": max(0, averaged - len(set(devices.sent)))}
    finally:
        devices.stop()
        broker.stop()


def _commit_and_die(state_dir: str, point: str) -> None:
    """Child process: start a state dir, then commit round 0 and die at `point` (os._exit, as SIGKILL would)."""
    from flora.broker import checkpoint as ck
    from flora.edge import adapter
    from flora.edge.synthetic import random_adapter

    m = _manifest()
    cp = ck.Checkpoint(state_dir)
    state = cp.start(m.model_id, 3, adapter.encode(random_adapter(m, 0), model_id=m.model_id, round=0, kind="global"))
    real_json = ck.atomic_write_json

    def dying_json(path, obj, *a, **k):
        if point == "before-state":
            os._exit(9)
        real_json(path, obj, *a, **k)
        if point == "after-state":
            os._exit(9)

    ck.atomic_write_json = dying_json
    cp.commit(state, 1, adapter.encode(random_adapter(m, 1), model_id=m.model_id, round=1, kind="global"),
              {"round": 0}, False)


def scenario_kill_in_commit(work: Path) -> Dict[str, Any]:
    from flora.broker.checkpoint import Checkpoint

    out = {"tried": 2, "crashed": 0, "leftover_files": 0, "points": {}}
    ctx = multiprocessing.get_context("spawn")
    for point in ("before-state", "after-state"):
        d = work / f"kill-{point}"
        p = ctx.Process(target=_commit_and_die, args=(str(d), point))
        p.start()
        p.join(60)
        Checkpoint(d).load()
        left = sorted(x.name for x in d.glob("global-*.safetensors"))
        out["points"][point] = left
        out["leftover_files"] += len(left) - 1
    return out


def scenario_flipped_bundle(work: Path) -> Dict[str, Any]:
    from flora.edge.synthetic import write_bundle

    m = _manifest()
    bundle = write_bundle(work / "flipped", m)
    path = bundle / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "flora.broker.cli", "--bundle", str(bundle), "--broker",
                           "mqtt://127.0.0.1:9", "--state-dir", str(work / "flipped-state"), "--rounds", "1"],
                          capture_output=True, text=True, timeout=60)
    started = (work / "flipped-state" / "state.json").exists()
    return {"tried": 1, "exit_code": proc.returncode, "refused": not started, "crashed": 0}


def scenario_metrics_growth(work: Path) -> Dict[str, Any]:
    from flora.edge.protocol import Metrics, Status
    from flora.edge.synthetic import encode_update, random_adapter

    m = _manifest()
    agg = _offline_aggregator(work / "growth", on_round_closed=lambda r, t: {"test_accuracy": float("nan")})
    agg.handle("status", "a", Status("a", "online").to_json())
    agg._open_round()
    agg.handle("update", "a", encode_update(m, random_adapter(m, 1), "a", 0, 5))
    good = json.loads(Metrics("a", 0, 0.5, 0.5, None, 10, 2, 1, 1.0, 0.1, 100.0, "step").to_json())
    agg.handle("metrics", "a", json.dumps({**good, "backend": "x" * 20_000_000}).encode())
    agg._close_round()
    strict = True
    for name in ("state.json", "history.jsonl"):
        text = (agg.checkpoint.dir / name).read_text()
        try:
            for line in text.splitlines() if name.endswith("l") else [text]:
                if line.strip():
                    json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except ValueError:
            strict = False
    size = sum((agg.checkpoint.dir / n).stat().st_size for n in ("state.json", "history.jsonl"))
    return {"tried": 2, "crashed": 0, "state_bytes": size, "strict_json": strict}


# -- report ----------------------------------------------------------------------------------------------
def markdown(label: str, results: Dict[str, Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = [f"# Hostile inputs and faults: {label}", "",
             f"`{meta['command']}` on {meta['python']}, git {meta['git']}, load average {meta['loadavg']}", "",
             "| scenario | inputs tried | rejected | crashed | survived | rounds lost | updates lost "
             "| double-counted | notes |", "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for name, r in results.items():
        survived = r.get("survived")
        lines.append(f"| {name} | {r.get('tried', '')} | {r.get('rejected', '')} | {r.get('crashed', '')} | "
                     f"{'yes' if survived else 'no' if survived is not None else ''} | {r.get('rounds_lost', '')} | "
                     f"{r.get('updates_lost', '')} | {r.get('double_counted', '')} | {r.get('notes', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="after")
    ap.add_argument("--n", type=int, default=400, help="random payloads per parser (and the adversarial set)")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--only", help="scenario names, comma-separated")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    sys.setrecursionlimit(1000)  # the default a device runs with
    logging.disable(logging.CRITICAL)  # tens of thousands of rejections would flood the terminal
    results: Dict[str, Dict[str, Any]] = {}
    want = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory(prefix="flora-hostile-") as tmp:
        work = Path(tmp)
        scenarios: Dict[str, Callable[[], Dict[str, Any]]] = {
            "parsers": lambda: scenario_parsers(args.n, args.seed),
            "aggregator-events": lambda: scenario_aggregator_events(args.n // 4, args.seed, work),
            "live-retained-status": lambda: scenario_live("retained-status", work / "live-status"),
            "live-update-header": lambda: scenario_live("update-header", work / "live-update"),
            "kill-in-commit": lambda: scenario_kill_in_commit(work),
            "flipped-bundle": lambda: scenario_flipped_bundle(work),
            "metrics-growth": lambda: scenario_metrics_growth(work),
        }
        for name, run in scenarios.items():
            if want and name not in want:
                continue
            start = time.monotonic()
            try:
                r = run()
            except Exception as exc:  # a scenario the version under test cannot even run is a finding too
                r = {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "crashed": 1}
            r["seconds"] = round(time.monotonic() - start, 2)
            r.setdefault("survived", _survived(name, r))
            r.setdefault("notes", _notes(name, r))
            results[name] = r
            print(f"{name}: {json.dumps(r)[:400]}", flush=True)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__import__("flora.edge", fromlist=["x"]).__file__).parents[1]).stdout.strip()
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "python": platform.python_version(),
            "git": git, "loadavg": [round(x, 2) for x in os.getloadavg()]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"hostile-{args.label}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (args.out / f"hostile-{args.label}.md").write_text(markdown(args.label, results, meta))
    return 0


def _survived(name: str, r: Dict[str, Any]) -> bool:
    if "error" in r:
        return False
    if name.startswith("live"):
        return bool(r.get("finished")) and not r.get("crashed")
    if name == "kill-in-commit":
        return r.get("leftover_files") == 0
    if name == "flipped-bundle":
        return bool(r.get("refused"))
    if name == "metrics-growth":
        return r.get("strict_json") and r.get("state_bytes", 0) < 1_000_000
    return not r.get("crashed") and not r.get("updates_lost")


def _notes(name: str, r: Dict[str, Any]) -> str:
    if "error" in r:
        return r["error"][:120]
    if r.get("crash_types"):
        return "crashes: " + ", ".join(f"{k} x{v}" for k, v in sorted(r["crash_types"].items()))
    if name.startswith("live"):
        return (f"{r['rounds_done']} of {r['rounds_done'] + r['rounds_lost']} rounds, {r['restarts']} restart(s), "
                f"{r['honest_averaged']}/{r['honest_sent']} honest updates averaged")
    if name == "kill-in-commit":
        return f"globals left after load(): {r['points']}"
    if name == "flipped-bundle":
        return f"exit {r['exit_code']}" + ("" if r["refused"] else ": the flipped adapter became the round-0 global")
    if name == "metrics-growth":
        return f"state.json + history.jsonl {r['state_bytes']:,} bytes, strict JSON: {r['strict_json']}"
    return ""


if __name__ == "__main__":
    sys.exit(main())
