"""Aggregation throughput: decode + validate + accumulate N client updates of the ViT-B/32 adapter.

    python -m bench.aggregate                 # N = 10, 100, 1000
    python -m bench.aggregate --n 10,100

Each N runs in a fresh process (so its peak RSS is its own) through the aggregator's own path:
`broker.validation.validate_update` then `FedAvg.accumulate`, on in-memory payloads (encoding them
is outside the timing). A second timing adds the spool write (atomic write + fsync per update) that
makes accepted updates survive an aggregator restart. Writes bench/results/aggregate.json and .md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def vitb32_manifest():
    """ViT-B/32 text tower at the default LoRA: 12 blocks, width 512, rank 8 on q, k, v, out."""
    from edge.bundle import FORMAT, FORMAT_VERSION, Manifest

    trainable = []
    for i in range(12):
        for t in ("q", "k", "v", "out"):
            trainable.append({"name": f"text.resblocks.{i}.attn.{t}.lora_A", "shape": [8, 512]})
            trainable.append({"name": f"text.resblocks.{i}.attn.{t}.lora_B", "shape": [512, 8]})
    return Manifest.from_dict({
        "format": FORMAT, "format_version": FORMAT_VERSION, "model_id": hashlib.sha256(b"bench").hexdigest(),
        "preset": "clip-vitb32", "architecture": "ViT-B-32", "base_weights_sha256": "0" * 64,
        "lora": {"tower": "text", "rank": 8, "alpha": 16.0, "targets": ["q", "k", "v", "out"]},
        "trainable": trainable, "classes": [str(i) for i in range(10)], "prompt_template": "a photo of a {}.",
        "text_context": 8, "preprocess": {"image_size": 224, "mean": [0.5] * 3, "std": [0.25] * 3},
        "input_kind": "features", "feature_dim": 512, "logit_scale": 100.0, "backends": ["step"], "files": {},
    })


def worker(n: int, spool: bool) -> Dict:
    from broker.checkpoint import Checkpoint
    from broker.strategies import FedAvg
    from broker.validation import validate_update
    from edge import adapter
    from edge.training import peak_rss_mb

    m = vitb32_manifest()
    rng = np.random.default_rng(0)
    bases = [{t.name: rng.standard_normal(t.shape).astype(np.float32) * 0.01 for t in m.trainable} for _ in range(4)]
    strategy = FedAvg()
    strategy.begin(m.trainable, bases[0])
    limit = adapter.max_blob_bytes(m.trainable)
    seen: set = set()
    busy = 0.0
    payload = 0
    with tempfile.TemporaryDirectory() as tmp:
        cp = Checkpoint(tmp) if spool else None
        for i in range(n):
            client = f"device-{i:05d}"
            blob = adapter.encode(bases[i % 4], model_id=m.model_id, round=0, kind="update", client_id=client,
                                  num_samples=int(rng.integers(10, 1000)))
            t0 = time.perf_counter()
            update = validate_update(blob, client, m, current_round=0, asked=None, already=seen, max_bytes=limit)
            if cp is not None:
                cp.spool(0, client, blob)
            strategy.accumulate(update.tensors, update.meta.num_samples)
            busy += time.perf_counter() - t0
            seen.add(client)
            payload += len(blob)
            del blob, update
    out = strategy.finalize()
    assert out is not None and strategy.count == n
    return {"n": n, "spool": spool, "seconds": busy, "payload_bytes": payload, "mb_per_s": payload / busy / 1e6,
            "update_bytes": payload // n, "peak_rss_mb": peak_rss_mb()}


def markdown(rows: List[Dict]) -> str:
    lines = ["# Aggregation benchmark (ViT-B/32 text-tower adapter, rank 8, q,k,v,out; fp32 updates)", "",
             f"`python -m bench.aggregate`; update payload {rows[0]['update_bytes'] / 1e6:.2f} MB each.", "",
             "| N updates | spool to disk | payload | time | throughput | peak RSS |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['n']} | {'yes' if r['spool'] else 'no'} | {r['payload_bytes'] / 1e6:.0f} MB | "
                     f"{r['seconds']:.2f} s | {r['mb_per_s']:.0f} MB/s | {r['peak_rss_mb']:.0f} MiB |")
    lines += ["", "Goal (issue 5): >= 1 GB/s of update payload (decode + validate + accumulate), peak RSS flat in N."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="10,100,1000")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--spool", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.spool)))
        return 0
    rows = []
    for spool in (False, True):
        for n in (int(x) for x in a.n.split(",")):
            cmd = [sys.executable, "-m", "bench.aggregate", "--worker", str(n)] + (["--spool"] if spool else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "aggregate.json").write_text(json.dumps(rows, indent=2) + "\n")
    (a.out / "aggregate.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
