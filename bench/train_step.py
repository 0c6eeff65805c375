"""Export and training-step benchmark: ORT on-device training vs the portable step graph vs PyTorch eager.

    python -m bench.train_step                      # ViT-B/32 random-init, batch 8 and 32, all tower modes
    python -m bench.train_step --towers text --batches 32 --steps 5

Each number comes from a fresh process (bench/step_worker.py), so peak RSS is that process's own,
with the same thread count for ONNX Runtime and PyTorch. Writes bench/results/train_step.json and
bench/results/train_step.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def run_json(cmd: List[str], timeout: int = 3600) -> Dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


EXPORT_SNIPPET = """
import json, sys, time
from pathlib import Path
from export.pipeline import ExportOptions, export_bundle
from edge.training import peak_rss_mb
t0 = time.perf_counter()
r = export_bundle(ExportOptions(preset=sys.argv[1], classes=sys.argv[4].split(","), out=Path(sys.argv[2]),
                  tower=sys.argv[3], random_init=True, backends=("ort-training", "step")), say=lambda m: None)
print(json.dumps({"export_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "stages_s": r.seconds}))
"""

COUNT_SNIPPET = """
import json, sys
from export.loading import WeightsSource, build_model
from export.presets import get_preset
m = build_model(get_preset(sys.argv[1]), WeightsSource("random-init", None, None, False, 0))
print(json.dumps({"params": sum(p.numel() for p in m.parameters())}))
"""


def export(model: str, tower: str, out: Path) -> Dict:
    result = run_json([sys.executable, "-c", EXPORT_SNIPPET, model, str(out), tower, ",".join(CLASSES)])
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    result.update(bundle_bytes=sum(files.values()), files=files)
    return result


def adapter_sizes(bundle: Path) -> Dict:
    sys.path.insert(0, str(ROOT))
    from edge import adapter
    from edge.bundle import ADAPTER, load_manifest

    manifest = load_manifest(bundle)
    tensors = adapter.load_file(bundle / ADAPTER).tensors
    return {
        "adapter_numel": manifest.adapter_numel,
        "adapter_fp32_bytes": len(adapter.encode(tensors, model_id=manifest.model_id, round=1, kind="global")),
        "adapter_fp16_bytes": len(adapter.encode(tensors, model_id=manifest.model_id, round=1, kind="global",
                                                 dtype="float16")),
    }


def worker(what: str, bundle: Path, batch: int, steps: int, threads: int) -> Dict:
    return run_json([sys.executable, "-m", "bench.step_worker", what, str(bundle), "--batch", str(batch),
                     "--steps", str(steps), "--threads", str(threads)])


def markdown(report: Dict) -> str:
    lines = [f"# Export and training-step benchmark ({report['model']}, random-init, {report['threads']} threads)", "",
             f"Measured {report['date']} on {report['machine']}; `python -m bench.train_step`.", ""]
    e = report["export"]["text"]
    size = report["sizes"]
    full = size["full_model_fp32_bytes"]
    lines += [
        "## Export (text tower, both backends)", "",
        "| export time | peak RSS | bundle on disk | full model fp32 | adapter fp32 | adapter fp16 |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {e['export_s']:.1f} s | {e['peak_rss_mb']:.0f} MiB | {e['bundle_bytes'] / 2**20:.0f} MiB | "
        f"{full / 2**20:.0f} MiB | {size['adapter_fp32_bytes'] / 2**20:.2f} MiB "
        f"({100 * size['adapter_fp32_bytes'] / full:.3f} %) | {size['adapter_fp16_bytes'] / 2**20:.2f} MiB "
        f"({100 * size['adapter_fp16_bytes'] / full:.3f} %) |",
        "",
        "## Training step (median of timed steps after warm-up)", "",
        "| tower | batch | ORT step | PyTorch step | step graph | ORT/PyTorch time | step/ORT time | "
        "ORT RSS | PyTorch RSS | step RSS | ORT/PyTorch RSS | step/ORT RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["steps"]:
        o, t, s = row["ort-training"], row["torch"], row["step"]
        lines.append(
            f"| {row['tower']} | {row['batch']} | {1e3 * o['step_s']:.1f} ms | {1e3 * t['step_s']:.1f} ms | "
            f"{1e3 * s['step_s']:.1f} ms | {o['step_s'] / t['step_s']:.2f} | {s['step_s'] / o['step_s']:.2f} | "
            f"{o['peak_rss_mb']:.0f} MiB | {t['peak_rss_mb']:.0f} MiB | {s['peak_rss_mb']:.0f} MiB | "
            f"{o['peak_rss_mb'] / t['peak_rss_mb']:.2f} | {s['peak_rss_mb'] / o['peak_rss_mb']:.2f} |"
        )
    if report.get("text_mode"):
        tm = report["text_mode"]
        lines += [
            "", "## Text mode on a device", "",
            f"- image features, once per image (batch {tm['feature_batch']}): "
            f"{1e3 * tm['feature_per_image_s']:.1f} ms/image",
        ]
        for b, v in sorted(tm["epoch_1000_cached_s"].items()):
            lines.append(f"- one epoch over 1000 cached images at batch {b}: ORT {v['ort-training']:.2f} s, "
                         f"step graph {v['step']:.2f} s")
    lines += ["", "Goals (issues 2 and 3): ORT step time <= PyTorch's; ORT peak RSS <= 0.6x PyTorch's; adapter "
              "<= 0.5 % of the full model (fp32), <= 0.25 % (fp16); step graph within 1.2x of ORT in time and memory."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="clip-vitb32")
    p.add_argument("--towers", default="text,vision,both")
    p.add_argument("--batches", default="8,32")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (pixel towers use a third)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    towers = a.towers.split(",")
    batches = [int(b) for b in a.batches.split(",")]
    report: Dict = {"model": a.model, "threads": a.threads, "date": time.strftime("%Y-%m-%d"),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                    "export": {}, "steps": [], "text_mode": {}}
    with tempfile.TemporaryDirectory(prefix="flora-bench-") as tmp:
        bundles = {}
        for tower in towers:
            out = Path(tmp) / tower
            print(f"exporting {a.model} ({tower} tower) ...", flush=True)
            report["export"][tower] = export(a.model, tower, out)
            bundles[tower] = out
        first = bundles[towers[0]]
        report["sizes"] = adapter_sizes(bundles.get("text", first))
        count = run_json([sys.executable, "-c", COUNT_SNIPPET, a.model])
        report["sizes"]["full_model_params"] = count["params"]
        report["sizes"]["full_model_fp32_bytes"] = 4 * count["params"]
        for tower in towers:
            steps = a.steps if tower == "text" else max(3, a.steps // 3)
            for batch in batches:
                row = {"tower": tower, "batch": batch}
                for what in ("ort-training", "step", "torch"):
                    print(f"  {tower} batch {batch}: {what} ...", flush=True)
                    row[what] = worker(what, bundles[tower], batch, steps, a.threads)
                report["steps"].append(row)
                if tower == "text":
                    report["text_mode"].setdefault("epoch_1000_cached_s", {})[str(batch)] = {
                        k: row[k]["epoch_1000_cached_s"] for k in ("ort-training", "step")}
        if "text" in bundles:
            feats = worker("features", bundles["text"], 32, 3, a.threads)
            report["text_mode"].update(feature_batch=32, feature_per_image_s=feats["per_image_s"])
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "train_step.json").write_text(json.dumps(report, indent=2) + "\n")
    (a.out / "train_step.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
