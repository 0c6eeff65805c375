"""What the strategies that keep every update cost: memory and time of median and trimmed mean.

    python -m bench.robust_memory                  # N = 10, 100, 500 updates of the ViT-B/32 adapter

For each strategy, storage (float32, float16) and N: the buffer's bytes (`memory_bytes`), the peak of
Python-tracked allocations over the whole round (tracemalloc: buffer plus the float64 column chunks of
`finalize`), the time to accumulate N updates and to finalize, and how far float16 storage moves the result
from float32 storage (max |difference| over the max |delta|). Updates are random deltas around a random
global in the ViT-B/32 text tower's LoRA layout (rank 8 on q, k, v, out: 393,216 floats), fed as the
aggregator feeds them (zero-copy flat views of encoded blobs). Also FedAvg, the streaming baseline. Writes
bench/results/robust_memory.json and robust_memory.md.
"""

from __future__ import annotations

import json
import os
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np

from flora.broker.strategies import make_strategy
from flora.edge.adapter import decode, encode, layout_of
from flora.edge.synthetic import random_adapter, vitb32_manifest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
COUNTS = (10, 100, 500)


def blobs(manifest, g, n: int):
    """n update blobs: the global plus a random delta each (built once per size, outside the timing)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        tensors = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in g.items()}
        out.append(encode(tensors, model_id=manifest.model_id, round=0, kind="update", client_id=f"c{i}",
                          num_samples=10))
    return out


def run(manifest, g, payloads, name: str, options: dict):
    s = make_strategy(name, options)
    views = [decode(b, manifest.trainable, copy=False, check_finite=False).tensors for b in payloads]
    tracemalloc.start()
    t0 = time.perf_counter()
    s.begin_round(manifest.trainable, g)
    for v in views:
        s.accumulate(v, 10)
    t1 = time.perf_counter()
    out = s.finalize()
    t2 = time.perf_counter()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    flat = np.concatenate([out[n].ravel() for n, *_ in layout_of(manifest.trainable).entries]).astype(np.float64)
    return {"accumulate_s": t1 - t0, "finalize_s": t2 - t1, "peak_traced_mib": peak / 2 ** 20,
            "buffer_mib": getattr(s, "memory_bytes", 0) / 2 ** 20}, flat


def main() -> None:
    m = vitb32_manifest()
    g = random_adapter(m, seed=1)
    gflat = np.concatenate([g[n].ravel() for n, *_ in layout_of(m.trainable).entries]).astype(np.float64)
    rows = []
    for n in COUNTS:
        payloads = blobs(m, g, n)
        for name in ("median", "trimmed-mean"):
            results = {}
            for storage in ("float32", "float16"):
                stats, flat = run(m, g, payloads, name, {"storage": storage, "max_memory_mb": 4096})
                results[storage] = flat
                rows.append({"strategy": name, "storage": storage, "updates": n, **stats})
            delta = np.max(np.abs(results["float32"] - gflat))
            rows[-1]["float16_error_rel"] = float(np.max(np.abs(results["float16"] - results["float32"])) / delta)
        stats, _ = run(m, g, payloads, "fedavg", {})
        rows.append({"strategy": "fedavg", "storage": "float64 sums", "updates": n, **stats})
        print(json.dumps(rows[-3:]), flush=True)
    out = {"numel": m.adapter_numel, "rows": rows, "loadavg": os.getloadavg(), "python": platform.python_version()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "robust_memory.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# Memory and time of the strategies that keep every update (ViT-B/32 adapter, 393,216 floats)", "",
             "`python -m bench.robust_memory`; one process, sizes in turn; peak = tracemalloc over begin_round .. "
             "finalize.", "",
             "| strategy | storage | updates | buffer MiB | peak traced MiB | accumulate s | finalize s | "
             "float16 error / max delta |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        err = r.get("float16_error_rel")
        lines.append(f"| {r['strategy']} | {r['storage']} | {r['updates']} | {r['buffer_mib']:.1f} | "
                     f"{r['peak_traced_mib']:.1f} | {r['accumulate_s']:.3f} | {r['finalize_s']:.3f} | "
                     f"{'-' if err is None else f'{err:.2e}'} |")
    lines += ["", f"Load average during the run: {', '.join(f'{x:.1f}' for x in out['loadavg'])}."]
    (RESULTS / "robust_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
