"""Fleet benchmark: N virtual devices, each its own MQTT connection, against the real flora-aggregator and mosquitto.

    python -m bench.fleet                          # N = 1000 and 10000, sync, both adapters
    python -m bench.fleet --n 200 --adapters tiny --rounds 1 --out /tmp/fleet   # the size the test runs

Per (N, mode, adapter) it starts a private mosquitto (file-descriptor limit raised first, which the
broker inherits), device processes (`bench.fleet_devices`: thousands of paho clients each, one
selector), then `flora-aggregator` as its own process, waiting for every device to be online. The
devices behave as agents do on the wire and send their update as soon as a round asks them (no
training time): the figures are the broker's and the aggregator's.

Measured: connect time (every device's CONNACK and subscriptions), round close time (an observer
client's clock: the `round` message of round r -> the `global` of round r + 1), updates/s and MB/s
through the aggregator (the round's accepted updates and bytes over its close time), the peak RSS
(VmHWM) of the aggregator and of the broker, updates lost (acknowledged to a device by the broker but
not counted in the round) and double-counted, and that each published global equals the FedAvg of the
updates the devices had acknowledged (exactly what was sent, once each). Writes
bench/results/fleet.json and fleet.md (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from flora.edge.protocol import DOWNLINK_QOS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from bench.fleet_devices import (  # noqa: E402
    FEDERATION,
    TEMPLATES,
    cpu_seconds,
    peak_rss_mib,
    raise_fd_limit,
    template_samples,
)

#: The adapters the fleet sends. ViT-B/32's text tower is 12 blocks of width 512.
ADAPTERS: Dict[str, Dict[str, Any]] = {
    "rank2": {"blocks": 12, "width": 512, "rank": 2, "targets": ("q", "v"), "dtype": "float16",
              "text": "ViT-B/32 text tower, LoRA rank 2 on q, v, sent as fp16 (`--fp16-updates`)"},
    "rank8": {"blocks": 12, "width": 512, "rank": 8, "targets": ("q", "k", "v", "out"), "dtype": "float32",
              "text": "ViT-B/32 text tower, the default LoRA: rank 8 on q, k, v, out, fp32"},
    "tiny": {"blocks": 2, "width": 16, "rank": 2, "targets": ("q", "v"), "dtype": "float32",
             "text": "a 2-block, width-16 toy adapter (the test's)"},
}
GOAL_ROUND_S = 60.0


def fleet_manifest(name: str):
    from flora.edge.synthetic import synthetic_manifest

    a = ADAPTERS[name]
    return synthetic_manifest(blocks=a["blocks"], width=a["width"], rank=a["rank"], targets=a["targets"])


def round_payload_bytes(name: str) -> int:
    """One update's payload bytes for an adapter (its dtype's bytes a value)."""
    a = ADAPTERS[name]
    return sum(t.numel for t in fleet_manifest(name).trainable) * (2 if a["dtype"] == "float16" else 4)


def broker_config(n: int) -> List[str]:
    """What a broker for N devices needs beyond the defaults (devices/mosquitto/README.md says the same):
    no connection cap, and a queue for the aggregator's session that holds a whole round of messages
    (each device sends a status, its update, its metrics and a status again) instead of dropping past 1,000."""
    return ["max_connections -1", f"max_queued_messages {max(1000, 4 * n + 1000)}", "max_queued_bytes 0",
            "set_tcp_nodelay true"]


class Observer:
    """One more client: when each `round` and `global` arrived, and every global's payload."""

    def __init__(self, url: str) -> None:
        from flora.edge.mqtt import BrokerConfig, Connection, make_client
        from flora.edge.protocol import Topics

        self.topics = Topics(FEDERATION)
        cfg = BrokerConfig.from_url(url)
        self.client = make_client(cfg, "fleet-observer")
        self.client.on_message = self._on_message
        self.rounds: Dict[int, float] = {}  # round -> first `training` announcement seen
        self.globals: Dict[int, float] = {}  # round -> when its global arrived
        self.global_blobs: Dict[int, bytes] = {}
        self.done_at: Optional[float] = None
        self.conn = Connection(cfg, self.client, on_connected=lambda c: c.subscribe(
            [(self.topics.round, 1), (self.topics.global_, 1)]))
        self.conn.start(timeout=30)

    def _on_message(self, client, userdata, msg) -> None:
        from flora.edge import adapter
        from flora.edge.protocol import RoundAnnouncement

        now = time.monotonic()
        if msg.topic == self.topics.round:
            ann = RoundAnnouncement.from_json(msg.payload)
            if ann.state == "training":
                self.rounds.setdefault(ann.round, now)
            elif self.done_at is None:
                self.done_at = now
        elif msg.topic == self.topics.global_:
            rnd = int(adapter.read_header(msg.payload)[1]["round"])
            if rnd not in self.globals:
                self.globals[rnd] = now
                self.global_blobs[rnd] = bytes(msg.payload)

    def stop(self) -> None:
        self.conn.stop()


class PeakRss(threading.Thread):
    """Polls VmHWM of some processes (the last value read before each exits is its peak)."""

    def __init__(self, pids: Dict[str, int], every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pids, self.every_s = pids, every_s
        self.peak = {name: 0.0 for name in pids}
        self.cpu = {name: 0.0 for name in pids}  # CPU seconds, last read
        self.halt = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.halt.is_set():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], peak_rss_mib(str(pid)))
                self.cpu[name] = max(self.cpu[name], cpu_seconds(str(pid)))
            self.halt.wait(self.every_s)

    def stop(self) -> Dict[str, float]:
        self.halt.set()
        self.join()
        return {**{name: round(v, 1) for name, v in self.peak.items()},
                **{f"{name}_cpu_s": round(v, 1) for name, v in self.cpu.items()}}


def _split(n: int, parts: int) -> List[range]:
    edges = np.linspace(0, n, parts + 1).astype(int)
    return [range(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _start_workers(stack: contextlib.ExitStack, url: str, manifest_file: Path, n: int, processes: int, dtype: str,
                   window: int, qos_down: int, out: Path, timeout: float, max_updates: int = 0) -> List[Dict[str, Any]]:
    workers = []
    for k, part in enumerate(_split(n, processes)):
        result = out / f"devices-{k}.json"
        cmd = [sys.executable, "-m", "bench.fleet_devices", "--url", url, "--manifest", str(manifest_file),
               "--first", str(part.start), "--count", str(len(part)), "--dtype", dtype, "--window", str(window),
               "--qos-down", str(qos_down), "--timeout", str(timeout), "--out", str(result),
               "--max-updates", str(max_updates)]
        log = stack.enter_context((out / f"devices-{k}.log").open("wb"))
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        workers.append({"proc": proc, "result": result, "log": log, "count": len(part)})
    return workers


def _wait_connected(workers: Sequence[Dict[str, Any]], timeout: float) -> float:
    """Seconds until the slowest device process had all its devices connected (they start together)."""
    seconds = []
    deadline = time.monotonic() + timeout
    for w in workers:
        line = w["proc"].stdout.readline()
        if not line:
            raise RuntimeError(f"a device process exited while connecting: {_tail(w['log'].name)}")
        seconds.append(json.loads(line)["seconds"])
        if time.monotonic() > deadline:
            raise TimeoutError("devices did not connect in time")
    return max(seconds)


def _devices_say(workers: Sequence[Dict[str, Any]]) -> str:
    """Stop the device processes (SIGTERM: each writes its result) and report what they were still waiting for."""
    out = []
    for w in workers:
        w["proc"].terminate()
        try:
            w["proc"].wait(timeout=30)
            got = json.loads(w["result"].read_text())
            out.append(json.dumps({k: got[k] for k in ("missing", "in_flight", "queued", "published")}))
        except (subprocess.TimeoutExpired, OSError, ValueError) as exc:
            out.append(f"no result ({exc})")
    return "; ".join(out)


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _aggregator_cmd(bundle: Path, url: str, state: Path, n: int, rounds: int, mode: str,
                    extra: Sequence[str], buffer: int = 0) -> List[str]:
    runner = os.environ.get("FLORA_FLEET_AGGREGATOR", "-m flora.broker.cli").split()  # e.g. under a profiler
    cmd = [sys.executable, *runner, "--bundle", str(bundle), "--broker", url,
           "--federation", FEDERATION, "--rounds", str(rounds), "--state-dir", str(state),
           "--wait-for-clients", str(n), "--round-timeout", "900", "--wait-timeout", "600"]
    if mode == "async":  # every version's buffer is a quarter of the fleet; each device sends once (see run_config)
        cmd += ["--mode", "async", "--buffer", str(buffer), "--max-staleness", str(rounds), "--min-clients", "1"]
    else:
        cmd += ["--min-clients", str(n)]
    return cmd + list(extra)


def expected_global(manifest, dtype: str, clients: Sequence[str]) -> np.ndarray:
    """The FedAvg of these devices' updates (device i sent template i % TEMPLATES), flat float32."""
    from bench.fleet_devices import _index_of
    from flora.edge.synthetic import random_adapter

    counts = np.bincount([_index_of(c) % TEMPLATES for c in clients], minlength=TEMPLATES)
    total = np.zeros(sum(t.numel for t in manifest.trainable))
    weight = 0
    for t in range(TEMPLATES):
        tensors = random_adapter(manifest, t, scale=0.01)
        flat = np.concatenate([tensors[s.name].astype(dtype).astype(np.float64).ravel() for s in manifest.trainable])
        total += counts[t] * template_samples(t) * flat
        weight += counts[t] * template_samples(t)
    return (total / weight).astype(np.float32)


def _pair(key: str, row: Dict) -> tuple:
    """(device, round) of a sync row's `reported` key, (device, base version) of an async one's `client@base`."""
    if row.get("mode") == "async":
        client, _, base = key.rpartition("@")
        return client, int(base)
    return key, row["round"]


def expected_async_global(manifest, dtype: str, row: Dict, globals_: Dict[int, bytes]) -> Optional[np.ndarray]:
    """The next version as FedBuff makes it from the version's accepted list: g_v + sum n w (u - g_b) / sum n
    (server lr 1), each u the device's template, each g the global the observer received."""
    from bench.fleet_devices import _index_of
    from flora.edge.synthetic import random_adapter

    if any(b not in globals_ for _, b, _, _ in row["accepted"]) or row["round"] not in globals_:
        return None
    flat = {b: _flat(blob, manifest).astype(np.float64) for b, blob in globals_.items()}
    templates = {}
    step, weight = np.zeros_like(flat[row["round"]]), 0
    for client, base, n, w in row["accepted"]:
        t = _index_of(client) % TEMPLATES
        if t not in templates:
            tensors = random_adapter(manifest, t, scale=0.01)
            templates[t] = np.concatenate([tensors[s.name].astype(dtype).astype(np.float64).ravel()
                                           for s in manifest.trainable])
        step += n * w * (templates[t] - flat[base])
        weight += n
    return (flat[row["round"]] + step / weight).astype(np.float32)


#: float64 sums in another order, then one rounding to float32: the global may differ from the expected by an ulp
MAX_ULPS = 2


def _ulps(got: np.ndarray, expected: Optional[np.ndarray]) -> Optional[float]:
    """The largest difference in units of float32 spacing at the expected values (one update counted twice, or
    lost, among 10,000 moves some value by about 15)."""
    if expected is None:
        return None
    return float(np.max(np.abs(got.astype(np.float64) - expected) / np.spacing(np.abs(expected))))


def _flat(blob: bytes, manifest) -> np.ndarray:
    from flora.edge import adapter

    tensors = adapter.decode(blob, manifest.trainable).as_float32()
    return np.concatenate([tensors[s.name].ravel() for s in manifest.trainable])


def run_config(n: int, mode: str, adapter_name: str, rounds: int, processes: int, window: int,
               qos_down: int = DOWNLINK_QOS,
               timeout: float = 900.0, keep: Optional[Path] = None, aggregator_args: Sequence[str] = ()) -> Dict:
    """One federation of n devices for `rounds` rounds (sync), or `rounds` versions of n / rounds updates each
    (async: every device sends one update, from the newest version it holds); the measured row."""
    from flora.broker.checkpoint import Checkpoint
    from flora.broker.mosquitto import start_mosquitto
    from flora.edge.synthetic import write_bundle

    a = ADAPTERS[adapter_name]
    fds = raise_fd_limit()
    if fds < n + 100:
        raise RuntimeError(f"RLIMIT_NOFILE is {fds}: {n} devices need more (raise the hard limit: ulimit -Hn)")
    manifest = fleet_manifest(adapter_name)
    with contextlib.ExitStack() as stack:
        if keep is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleet-")))
        else:  # kept for a look at the logs
            keep.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix="fleet-", dir=keep))
        bundle = write_bundle(tmp / "bundle", manifest)
        broker = start_mosquitto(tmp / "mosquitto", extra_config=broker_config(n), anonymous=True)
        procs: List[subprocess.Popen] = []
        observer = None
        try:
            observer = Observer(broker.url)
            t_start = time.monotonic()
            workers = _start_workers(stack, broker.url, bundle / "manifest.json", n, processes, a["dtype"], window,
                                     qos_down, tmp, timeout, max_updates=1 if mode == "async" else 0)
            procs += [w["proc"] for w in workers]
            connect_s = _wait_connected(workers, timeout)
            agg_log = stack.enter_context((tmp / "aggregator.log").open("wb"))
            agg = subprocess.Popen(_aggregator_cmd(bundle, broker.url, tmp / "state", n, rounds, mode,
                                                   aggregator_args, buffer=n // rounds), cwd=ROOT, stdout=agg_log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(agg)
            rss = PeakRss({"aggregator": agg.pid, "broker": broker.process.pid})
            try:
                code = agg.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"the federation did not finish in {timeout:.0f} s; the devices say: "
                                   f"{_devices_say(workers)}") from None
            finally:
                peaks = rss.stop()
            if code != 0:
                raise RuntimeError(f"flora-aggregator exited with {code}:\n{_tail(agg_log.name)}")
            for w in workers:
                if w["proc"].wait(timeout=120) != 0:
                    raise RuntimeError(f"a device process failed:\n{_tail(w['log'].name)}")
            devices = [json.loads(w["result"].read_text()) for w in workers]
            history = Checkpoint(tmp / "state").history()
            return _row(n, mode, adapter_name, rounds, processes, window, qos_down, connect_s, devices, history,
                        observer, peaks, manifest, time.monotonic() - t_start)
        finally:
            if observer is not None:
                observer.stop()
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
            broker.stop()


def _row(n, mode, adapter_name, rounds, processes, window, qos_down, connect_s, devices, history, observer, peaks,
         manifest, wall_s) -> Dict:
    a = ADAPTERS[adapter_name]
    acked: Dict[int, List[str]] = {}
    for d in devices:
        for r, ids in d["acked"].items():
            acked.setdefault(int(r), []).extend(ids)
    per_round = []
    sent_pairs = {(c, r) for r, ids in acked.items() for c in ids}  # (device, round or base version)
    counted_pairs = [_pair(key, row) for row in history for key in row["reported"]]
    for row in history:
        r = row["round"]
        counted = {_pair(key, row) for key in row["reported"]}
        sent = {p for p in sent_pairs if p[1] == r} if mode == "sync" else counted & sent_pairs
        close_s = observer.globals.get(r + 1, float("nan")) - observer.rounds.get(r, float("nan"))
        if mode == "sync":
            expected = expected_global(manifest, a["dtype"], sorted(c for c, _ in sent))
        else:
            expected = expected_async_global(manifest, a["dtype"], row, observer.global_blobs)
        blob = observer.global_blobs.get(r + 1)
        ulps = _ulps(_flat(blob, manifest), expected) if blob is not None else None
        per_round.append({
            "round": r, "close_s": round(close_s, 3), "aggregator_wall_s": row["wall_time_s"],
            "updates": row["num_reported"], "bytes_received": row["bytes_received"],
            "updates_per_s": round(row["num_reported"] / close_s, 1),
            "mb_per_s": round(row["bytes_received"] / close_s / 1e6, 2),
            "acked_by_broker": len(sent), "counted_not_acked": len(counted - sent_pairs),
            "rejections": row["rejection_counts"], "global_max_ulps": ulps,
            **({"staleness": row["staleness"]} if mode == "async" else {}),
        })
    lost = len(sent_pairs - set(counted_pairs))  # acknowledged to a device, in no round's (or version's) sums
    update_bytes = per_round[0]["bytes_received"] // max(per_round[0]["updates"], 1) if per_round else 0
    return {
        "n": n, "mode": mode, "adapter": adapter_name, "dtype": a["dtype"], "update_bytes": update_bytes,
        "rounds": rounds, "device_processes": processes, "window": window, "qos_down": qos_down,
        "connect_s": connect_s, "per_round": per_round,
        "round_close_s_max": max(r["close_s"] for r in per_round),
        "acked": len(sent_pairs), "lost": lost, "double_counted": len(counted_pairs) - len(set(counted_pairs)),
        "global_exact": all(r["global_max_ulps"] is not None and r["global_max_ulps"] <= MAX_ULPS for r in per_round),
        "aggregator_peak_rss_mib": peaks["aggregator"], "broker_peak_rss_mib": peaks["broker"],
        "device_process_peak_rss_mib": max(d["peak_rss_mib"] for d in devices),
        # CPU seconds over the whole run (start-up, connections, every round): what a quiet machine would need
        "cpu_s": {"aggregator": peaks["aggregator_cpu_s"], "broker": peaks["broker_cpu_s"],
                  "devices": round(sum(d["cpu_s"] for d in devices), 1)},
        "bytes_down_per_device": round(sum(d["bytes_global"] + d["bytes_round"] for d in devices) / n),
        "globals_per_device": round(sum(d["globals_received"] for d in devices) / n, 2),
        "round_messages_per_device": round(sum(d["rounds_received"] for d in devices) / n, 2),
        "wall_s": round(wall_s, 1), "load_after": [round(x, 2) for x in os.getloadavg()],
    }


# --- the report -----------------------------------------------------------------------------------------------


def markdown(result: Dict) -> str:
    lines = ["# Fleet benchmark", "",
             f"Command: `{result['command']}`. Machine: {result['machine']}. Load before: {result['load_before']}.",
             "Every device is its own MQTT connection (paho client, own session and retained status) and sends "
             "what an agent sends (statuses, its update, its metrics); the aggregator is `flora-aggregator` in its "
             "own process, journaling every update and flushing the journal before the PUBACKs (group commit). "
             "Round close time: an observer client's clock from the `round` message to the next `global`. sync: "
             "rounds asking every device; async: `--mode async`, versions of N / rounds updates, each device "
             "sending one update from the newest version it holds (later versions fold earlier bases, staleness-"
             "weighted). Lost: acknowledged to a device by the broker but in no round's sums; each global is "
             "checked against the FedAvg (sync) or FedBuff step (async) of exactly the updates it lists.", "",
             "| N | mode | adapter | update | connect | round close (max) | updates/s | MB/s | aggregator RSS "
             "| broker RSS | lost | double-counted | global = FedAvg of the acked updates |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        worst = max(r["per_round"], key=lambda x: x["close_s"])
        lines.append(
            f"| {r['n']} | {r['mode']} | {r['adapter']} | {r['update_bytes'] / 1024:.0f} KiB | {r['connect_s']:.1f} s "
            f"| {r['round_close_s_max']:.1f} s | {worst['updates_per_s']:.0f} | {worst['mb_per_s']:.1f} "
            f"| {r['aggregator_peak_rss_mib']:.0f} MiB | {r['broker_peak_rss_mib']:.0f} MiB | {r['lost']} "
            f"| {r['double_counted']} | {'yes' if r['global_exact'] else 'NO'} |")
    lines += ["", "Adapters:"] + [f"- `{k}`: {v['text']}" for k, v in ADAPTERS.items()
                                  if any(r["adapter"] == k for r in result["rows"])]
    lines += ["", f"Broker settings for N devices: `{'`, `'.join(broker_config(10000))}` (at N = 10000)."]
    for skip in result.get("skipped", []):
        lines.append(f"- not run: N = {skip['n']}, {skip['mode']}, {skip['adapter']}: {skip['why']} (the broker holds "
                     "the part of a round the aggregator has not read yet in memory, on a 24 GB machine shared "
                     "with other work)")
    lines += _verdict(result["rows"])
    return "\n".join(lines) + "\n"


def _verdict(rows: List[Dict]) -> List[str]:
    target = [r for r in rows if r["n"] == 10000 and r["mode"] == "sync" and r["adapter"] == "rank2"]
    if not target:
        return []
    r = target[0]
    rss = {x["n"]: x["aggregator_peak_rss_mib"] for x in rows if x["mode"] == "sync" and x["adapter"] == "rank2"}
    met = r["round_close_s_max"] <= GOAL_ROUND_S and r["lost"] == 0 and r["double_counted"] == 0 and r["global_exact"]
    return ["", f"Goal (10,000-device sync round of 96 KiB updates closes in <= {GOAL_ROUND_S:.0f} s, nothing lost, "
            f"aggregator RSS flat in N): {'met' if met else 'NOT met'}: {r['round_close_s_max']:.1f} s, lost "
            f"{r['lost']}, aggregator peak RSS {', '.join(f'{v:.0f} MiB at N = {k}' for k, v in sorted(rss.items()))}."]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="1000,10000", help="comma-separated device counts")
    p.add_argument("--modes", default="sync", help="comma-separated: sync, async")
    p.add_argument("--adapters", default="rank2,rank8", help=f"comma-separated: {', '.join(ADAPTERS)}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--processes", type=int, default=2, help="device processes")
    p.add_argument("--window", type=int, default=64, help="updates in flight per device process")
    p.add_argument("--qos-down", type=int, default=DOWNLINK_QOS, choices=[0, 1],
                   help="devices' subscription QoS of global and round (default: the agent's, %(default)s)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for fleet.json and fleet.md")
    p.add_argument("--keep", type=Path, help="keep each run's folder (logs, state dir) under this folder")
    p.add_argument("--max-round-gb", type=float, default=4.0,
                   help="skip a configuration whose round of updates exceeds this many GB: the broker queues what the "
                        "aggregator has not read yet, in memory (default: %(default)s)")
    args = p.parse_args(argv)
    result = {"command": "python -m bench.fleet " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"Python {platform.python_version()}",
              "load_before": [round(x, 2) for x in os.getloadavg()], "rows": []}
    result["skipped"] = []
    for n in (int(x) for x in args.n.split(",")):
        for mode in args.modes.split(","):
            for name in args.adapters.split(","):
                payload_gb = n * round_payload_bytes(name) / 1e9
                if payload_gb > args.max_round_gb:
                    result["skipped"].append({"n": n, "mode": mode, "adapter": name, "round_gb": round(payload_gb, 1),
                                              "why": f"a round is {payload_gb:.1f} GB of updates, over "
                                                     f"--max-round-gb {args.max_round_gb:g}"})
                    continue
                row = run_config(n, mode, name, args.rounds, args.processes, args.window, args.qos_down, args.timeout,
                                 keep=args.keep)
                print(json.dumps({k: v for k, v in row.items() if k != "per_round"}), flush=True)
                result["rows"].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "fleet.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
