"""Export and training-step benchmark: ORT on-device training vs the portable step graph vs PyTorch eager.

    python -m bench.train_step                      # ViT-B/32 random-init, batch 8 and 32, all tower modes
    python -m bench.train_step --model clip-tiny    # the toy model (writes train_step_clip-tiny.*)
    python -m bench.train_step --towers text --batches 32 --steps 5

Every export and every measurement runs in a fresh process (bench/step_worker.py), so its memory is
its own, with the same thread count for ONNX Runtime and PyTorch. Each tower is exported once per
backend, so export time and peak memory are those of one backend's artifacts. Writes
bench/results/train_step[_MODEL].json and .md.
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

from bench.report_files import write_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
BACKENDS = ("ort-training", "step")


def run_json(cmd: List[str], timeout: int = 3600) -> Dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


EXPORT_SNIPPET = """
import json, sys, time
from pathlib import Path
from flora.export.pipeline import ExportOptions, export_bundle
from bench.step_worker import vm_hwm_mb
t0 = time.perf_counter()
r = export_bundle(ExportOptions(preset=sys.argv[1], classes=sys.argv[4].split(","), out=Path(sys.argv[2]),
                  tower=sys.argv[3], random_init=True, backends=(sys.argv[5],)), say=lambda m: None)
print(json.dumps({"export_s": time.perf_counter() - t0, "peak_rss_mb": vm_hwm_mb(), "stages_s": r.seconds}))
"""

COUNT_SNIPPET = """
import json, sys
from flora.export.loading import WeightsSource, build_model
from flora.export.presets import get_preset
m = build_model(get_preset(sys.argv[1]), WeightsSource("random-init", None, None, False, 0))
print(json.dumps({"params": sum(p.numel() for p in m.parameters())}))
"""


def cpu_name() -> str:
    """The CPU model (Linux), since ONNX Runtime's and PyTorch's kernels rank differently per CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu ?")
    except OSError:
        return platform.processor() or "cpu ?"


def export(model: str, tower: str, backend: str, out: Path) -> Dict:
    result = run_json([sys.executable, "-c", EXPORT_SNIPPET, model, str(out), tower, ",".join(CLASSES), backend])
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    result.update(bundle_bytes=sum(files.values()), files=files)
    return result


def adapter_sizes(bundle: Path) -> Dict:
    sys.path.insert(0, str(ROOT))
    from flora.edge import adapter
    from flora.edge.bundle import ADAPTER, load_manifest

    manifest = load_manifest(bundle)
    tensors = adapter.load_file(bundle / ADAPTER).tensors
    return {
        "adapter_numel": manifest.adapter_numel,
        "adapter_fp32_bytes": len(adapter.encode(tensors, model_id=manifest.model_id, round=1, kind="global")),
        "adapter_fp16_bytes": len(adapter.encode(tensors, model_id=manifest.model_id, round=1, kind="global",
                                                 dtype="float16")),
    }


def worker(what: str, bundle: Path, batch: int, steps: int, threads: int, *extra: str) -> Dict:
    return run_json([sys.executable, "-m", "bench.step_worker", what, str(bundle), "--batch", str(batch),
                     "--steps", str(steps), "--threads", str(threads), *extra])


def _mib(x: float) -> str:
    return f"{x:.0f} MiB"


def markdown(report: Dict) -> str:
    lines = [f"# Export and training-step benchmark ({report['model']}, random-init, {report['threads']} threads)", "",
             f"Measured {report['date']} on {report['machine']}; `{report['command']}`.", "",
             "## Export (one backend per export)", "",
             "| tower | backend | export time | peak RSS | bundle on disk |", "| --- | --- | --- | --- | --- |"]
    for tower, by_backend in report["export"].items():
        for backend, e in by_backend.items():
            lines.append(f"| {tower} | {backend} | {e['export_s']:.1f} s | {_mib(e['peak_rss_mb'])} | "
                         f"{_mib(e['bundle_bytes'] / 2**20)} |")
    size = report["sizes"]
    full = size["full_model_fp32_bytes"]
    lines += [
        "", "## Adapter size (text tower, rank 8 on q,k,v,out)", "",
        "| full model fp32 | adapter fp32 | adapter fp16 |", "| --- | --- | --- |",
        f"| {full / 2**20:.1f} MiB | {size['adapter_fp32_bytes'] / 2**20:.3f} MiB "
        f"({100 * size['adapter_fp32_bytes'] / full:.3f} %) | {size['adapter_fp16_bytes'] / 2**20:.3f} MiB "
        f"({100 * size['adapter_fp16_bytes'] / full:.3f} %) |",
        "", "## Training step (median of timed steps after warm-up)", "",
        "Memory is the peak resident set over the training steps (`train_peak_mb`: everything resident plus "
        "what the steps allocate); the peak while loading is in the next table.", "",
        "| tower | batch | ORT step | step graph | PyTorch step | ORT/PyTorch time | step/ORT time | "
        "ORT RSS | step RSS | PyTorch RSS | ORT/PyTorch RSS | step/ORT RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["steps"]:
        o, s, t = row["ort-training"], row["step"], row["torch"]
        lines.append(
            f"| {row['tower']} | {row['batch']} | {1e3 * o['step_s']:.1f} ms | {1e3 * s['step_s']:.1f} ms | "
            f"{1e3 * t['step_s']:.1f} ms | {o['step_s'] / t['step_s']:.2f} | {s['step_s'] / o['step_s']:.2f} | "
            f"{_mib(o['train_peak_mb'])} | {_mib(s['train_peak_mb'])} | {_mib(t['train_peak_mb'])} | "
            f"{o['train_peak_mb'] / t['train_peak_mb']:.2f} | {s['train_peak_mb'] / o['train_peak_mb']:.2f} |"
        )
    lines += ["", "Peak RSS while loading (before the first step; PyTorch builds a whole CLIP to get the weights):",
              "", "| tower | batch | ORT | step graph | PyTorch |", "| --- | --- | --- | --- | --- |"]
    for row in report["steps"]:
        lines.append(f"| {row['tower']} | {row['batch']} | " + " | ".join(
            _mib(row[k]["load_peak_mb"]) for k in ("ort-training", "step", "torch")) + " |")
    tm = report.get("text_mode")
    if tm:
        lines += ["", "## Text mode on a device", "",
                  f"- image features, once per image (batch {tm['feature_batch']}): "
                  f"{1e3 * tm['feature_per_image_s']:.1f} ms/image"]
        for b, v in sorted(tm["epoch_1000_cached_s"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"- one epoch over 1000 cached images at batch {b}: ORT {v['ort-training']:.2f} s, "
                         f"step graph {v['step']:.2f} s")
        lines += ["", f"An agent's whole process (trainer, then the image encoder over {tm['agent_images']} images, "
                  "then one epoch): peak RSS", "", "| backend | batch | peak RSS | features | epoch |",
                  "| --- | --- | --- | --- | --- |"]
        for row in tm["agent"]:
            lines.append(f"| {row['backend']} | {row['batch']} | {_mib(row['peak_mb'])} | {row['features_s']:.1f} s "
                         f"| {row['epoch_s']:.2f} s |")
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
    command = " ".join(["python -m bench.train_step", *(sys.argv[1:] if argv is None else argv)])
    report: Dict = {"model": a.model, "threads": a.threads, "date": time.strftime("%Y-%m-%d"), "command": command,
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                               f"{cpu_name()}",
                    "export": {}, "steps": [], "text_mode": {}}
    with tempfile.TemporaryDirectory(prefix="flora-bench-") as tmp:
        bundles: Dict[str, Dict[str, Path]] = {}
        for tower in towers:
            for backend in BACKENDS:
                out = Path(tmp) / f"{tower}-{backend}"
                print(f"exporting {a.model} ({tower} tower, {backend}) ...", flush=True)
                report["export"].setdefault(tower, {})[backend] = export(a.model, tower, backend, out)
                bundles.setdefault(tower, {})[backend] = out
        report["sizes"] = adapter_sizes(bundles.get("text", bundles[towers[0]])["ort-training"])
        count = run_json([sys.executable, "-c", COUNT_SNIPPET, a.model])
        report["sizes"]["full_model_params"] = count["params"]
        report["sizes"]["full_model_fp32_bytes"] = 4 * count["params"]
        for tower in towers:
            steps = a.steps if tower == "text" else max(3, a.steps // 3)
            for batch in batches:
                row = {"tower": tower, "batch": batch}
                for what in (*BACKENDS, "torch"):
                    print(f"  {tower} batch {batch}: {what} ...", flush=True)
                    row[what] = worker(what, bundles[tower][what if what in BACKENDS else "ort-training"],
                                       batch, steps, a.threads)
                report["steps"].append(row)
                if tower == "text":
                    report["text_mode"].setdefault("epoch_1000_cached_s", {})[str(batch)] = {
                        k: row[k]["epoch_1000_cached_s"] for k in BACKENDS}
        if "text" in bundles:
            feats = worker("features", bundles["text"]["ort-training"], 32, 3, a.threads)
            agent = []
            for backend in BACKENDS:
                for batch in batches:
                    print(f"  agent, text mode, {backend} batch {batch} ...", flush=True)
                    r = worker("agent", bundles["text"][backend], batch, 0, a.threads, "--backend", backend)
                    agent.append({"backend": backend, **r})
            report["text_mode"].update(feature_batch=32, feature_per_image_s=feats["per_image_s"],
                                       features=feats, agent=agent, agent_images=agent[0]["images"])
    stem = "train_step" if a.model == "clip-vitb32" else f"train_step_{a.model}"
    write_report(a.out, stem, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
