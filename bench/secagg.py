"""Secure aggregation's cost per round against plain FedAvg: server and client time, bytes up and down.

    python -m bench.secagg [--clients 10 100 1000] [--params 24576 1572864] [--drop 0.01]

The federation runs in one process (`bench.secagg_sim`): every client's real state machine (fresh keys,
Shamir shares, sealing, masking) and the aggregator's, wired by a router; the server's time is what
its `handle` and `step` calls take, a client's is what its own calls take, both in CPU seconds of
this single-threaded process (robust to a busy machine: `time.process_time`). Plain FedAvg is the
aggregator's path for one round: validate every fp32 update blob and fold it into the FedAvg
strategy, then finalize. The client's overhead is set against a text-mode round from
bench/results/train_step.json (one epoch of the ViT-B/32 text tower over cached features).
Writes bench/results/secagg.json and secagg.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from bench.secagg_sim import cpu, make_federation, run_attempt
from flora.broker.strategies.fedavg import FedAvg
from flora.broker.validation import RoundView, validate_update
from flora.edge import adapter
from flora.edge.secagg.encoding import Encoding, decode_sum
from flora.edge.secagg.messages import MASKED
from flora.edge.secagg.params import SecAggParams
from flora.edge.secagg.ring import default_shares, default_threshold
from flora.edge.synthetic import encode_update, random_adapter, synthetic_manifest

RESULTS = Path(__file__).resolve().parent / "results"
#: adapter shapes with these parameter counts (12 blocks x q,k,v,out x A and B)
SHAPES = {24_576: dict(blocks=12, width=64, rank=4), 1_572_864: dict(blocks=12, width=512, rank=32)}
DISTINCT = 4  # distinct updates, shared round-robin by the clients (memory stays flat at 1,000 x 1.5 M)


def plain_fedavg(n: int, manifest, updates: List[Dict[str, np.ndarray]]) -> Dict[str, float]:
    """The aggregator's work for one plain round of n fp32 updates (validate + fold each, then finalize), and
    one client's (encode its update blob)."""
    t = cpu()
    blobs = [encode_update(manifest, u, f"c{i}", 0, num_samples=10) for i, u in enumerate(updates)]
    client_s = (cpu() - t) / len(updates)
    strategy = FedAvg()
    global_ = {s.name: np.zeros(s.shape, np.float32) for s in manifest.trainable}
    max_bytes = adapter.max_blob_bytes(manifest.trainable)
    start = cpu()
    strategy.begin_round(manifest.trainable, global_)
    for i in range(n):  # DISTINCT blobs in turn, each validated afresh as its sender's
        update = validate_update(blobs[i % DISTINCT], f"c{i % DISTINCT}", manifest, RoundView(0, None, set()),
                                 max_bytes)
        strategy.accumulate(update.tensors, 10)
    strategy.finalize()
    server_s = cpu() - start
    glob = adapter.encode(global_, model_id=manifest.model_id, round=1, kind="global")
    return {"server_s": server_s, "client_s": client_s, "bytes_up": len(blobs[0]), "bytes_down": len(glob)}


def secure(n: int, d: int, fed, drop: float, shares: int, threshold: int) -> Dict[str, float]:
    clients = fed.clients[:n]
    rng = np.random.default_rng(0)
    pool = [rng.uniform(-0.05, 0.05, d).astype(np.float32) for _ in range(DISTINCT)]
    deltas = {c: pool[i % DISTINCT] for i, c in enumerate(clients)}
    weights = {c: 1 + i % 50 for i, c in enumerate(clients)}
    enc = Encoding()
    params = SecAggParams.sized(n, shares, threshold, enc)
    ndrop = round(drop * n)
    drops = {c: MASKED for c in clients[1: 1 + ndrop * 7: 7][:ndrop]}  # spread out on the ring, by id
    outcome, server, traffic = run_attempt(fed, params, deltas, weights, drops=drops)
    if outcome.status != "done":
        raise RuntimeError(f"the secure round aborted: {outcome.reason}")
    total, wsum = decode_sum(outcome.total, enc)
    exact = sum(weights[c] * deltas[c].astype(np.float64) for c in outcome.survivors) / wsum
    err = float(np.max(np.abs(total / wsum - exact)))
    assert err <= enc.error_bound(len(outcome.survivors), wsum), err
    client_times = [traffic.client_s[c] for c in outcome.survivors]
    return {
        "server_s": traffic.server_s, "client_s_mean": float(np.mean(client_times)),
        "client_s_max": float(np.max(client_times)),
        "bytes_up": float(np.mean([traffic.bytes_up[c] for c in outcome.survivors])),
        "bytes_down": float(np.mean([traffic.bytes_down[c] for c in outcome.survivors])),
        "shares": shares, "threshold": threshold, "bits": params.bits, "dropped": len(outcome.dropped),
        "max_error": err, "error_bound": enc.error_bound(len(outcome.survivors), wsum),
        "server_stages_wall_s": {k: round(v, 4) for k, v in server.timings.items()},
    }


def text_round_s() -> Dict[str, float]:
    path = RESULTS / "train_step.json"
    try:
        tm = json.loads(path.read_text())["text_mode"]
        return {"epoch_1000_images_s": tm["epoch_1000_cached_s"]["32"]["ort-training"],
                "agent_epoch_256_images_s": min(r["epoch_s"] for r in tm["agent"] if r["batch"] == 32)}
    except (OSError, KeyError, ValueError):
        return {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--params", type=int, nargs="+", default=sorted(SHAPES))
    ap.add_argument("--drop", type=float, default=0.0, help="fraction of clients that drop before their input")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        fed = make_federation(Path(tmp), max(args.clients), federation="bench")
        print(f"{max(args.clients)} identities issued in {time.perf_counter() - t:.1f} s", flush=True)
        for d in args.params:
            manifest = synthetic_manifest(**SHAPES[d])
            assert sum(int(np.prod(s.shape)) for s in manifest.trainable) == d
            updates = [random_adapter(manifest, seed=i, scale=0.05) for i in range(DISTINCT)]
            for n in args.clients:
                plain = plain_fedavg(n, manifest, updates)
                k = default_shares(n)
                sec = secure(n, d, fed, args.drop, k, default_threshold(k))
                sec["bytes_down"] += plain["bytes_down"]  # a secure round downloads the global as well
                row = {"clients": n, "params": d, "plain": plain, "secure": sec,
                       "server_ratio": sec["server_s"] / plain["server_s"],
                       "bytes_up_ratio": sec["bytes_up"] / plain["bytes_up"], "load": os.getloadavg()}
                rows.append(row)
                print(f"n={n:5d} d={d:8d} k={k:2d}: server {sec['server_s']:.3f} s (plain {plain['server_s']:.3f} s), "
                      f"client {sec['client_s_mean'] * 1e3:.1f} ms mean / {sec['client_s_max'] * 1e3:.1f} ms max, "
                      f"up {sec['bytes_up'] / 1e3:.1f} kB (plain {plain['bytes_up'] / 1e3:.1f}), down "
                      f"{sec['bytes_down'] / 1e3:.1f} kB (plain {plain['bytes_down'] / 1e3:.1f}); load "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
    report = {"command": "python -m bench.secagg " + " ".join(argv or []), "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                         f"{platform.processor() or ''}", "drop": args.drop, "text_round": text_round_s(),
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.drop == 0 else f"_drop{args.drop:g}"
    (args.out / f"secagg{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"secagg{suffix}.md").write_text(markdown(report))
    return 0


def markdown(report) -> str:
    tr = report["text_round"]
    lines = [f"# Secure aggregation vs plain FedAvg, one round (`{report['command'].strip()}`)", "",
             f"{report['date']}, {report['machine']}; {report['drop']:.0%} of clients drop before their masked input.",
             "Server: the aggregator's work for the whole round (every message handled, every stage closed,",
             "the sum recovered); client: one client's own work (keys, shares, masking, answers); both in CPU",
             "seconds (time.process_time of one single-threaded process: robust to a busy machine). Bytes are",
             "per client, as published (up) and as delivered to it (down, the global adapter included in both).",
             "k = shares (neighbours), t = threshold; the ring is Z_(2^bits) of the default encoding.",
             "", "| clients | params | k / t | ring | server secure | server plain | client secure (mean / max) | "
             "up secure / plain | down secure / plain | load |", "|" + " --- |" * 10]
    for r in report["rows"]:
        s, p = r["secure"], r["plain"]
        lines.append(f"| {r['clients']} | {r['params']:,} | {s['shares']} / {s['threshold']} | {s['bits']} bits | "
                     f"{s['server_s']:.3f} s | {p['server_s']:.3f} s | {s['client_s_mean'] * 1e3:.1f} / "
                     f"{s['client_s_max'] * 1e3:.1f} ms | {s['bytes_up'] / 1e3:.1f} / {p['bytes_up'] / 1e3:.1f} kB | "
                     f"{s['bytes_down'] / 1e3:.1f} / {p['bytes_down'] / 1e3:.1f} kB | {r['load'][0]:.1f} |")
    if tr:
        lines += ["", f"Client overhead against a text-mode round (bench/results/train_step.json, ViT-B/32 text "
                      f"tower, batch 32): one epoch over 1000 cached images {tr['epoch_1000_images_s']:.2f} s; the "
                      f"agent's epoch over 256 images {tr['agent_epoch_256_images_s']:.2f} s.", "",
                  "| clients | params | client secure (max) | / 1000-image epoch | / 256-image epoch |",
                  "| --- | --- | --- | --- | --- |"]
        for r in report["rows"]:
            c = r["secure"]["client_s_max"]
            lines.append(f"| {r['clients']} | {r['params']:,} | {c * 1e3:.1f} ms | "
                         f"{c / tr['epoch_1000_images_s']:.1%} | {c / tr['agent_epoch_256_images_s']:.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
