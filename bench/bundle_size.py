"""Bundle size on disk: frozen weights stored once (weights.data), and what `flora-export strip` leaves.

    python -m bench.bundle_size                    # random-init ViT-B/32, text tower, both backends
    python -m bench.bundle_size --model clip-tiny
    python -m bench.bundle_size --baseline /path/to/an/older/checkout   # also export with that code, as it was

Each graph holding its own copy of the weights it reads is what bundles were before weights.data:
that size is the bundle's size less the shared file plus every graph's referenced bytes (the
manifest's onnx.shared_data), and with `--baseline` the older code's bundle is exported and measured
as well. Writes bench/results/bundle_size[_MODEL].json and .md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

from bench.report_files import write_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

EXPORT_SNIPPET = """
import sys
from pathlib import Path
from flora.export.pipeline import ExportOptions, export_bundle
export_bundle(ExportOptions(preset=sys.argv[1], classes=sys.argv[3].split(","), out=Path(sys.argv[2]),
              random_init=True, backends=("ort-training", "step")), say=lambda m: None)
"""


def sizes(folder: Path) -> Dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def export(model: str, out: Path, cwd: Path, python: str) -> Dict:
    t0 = time.perf_counter()
    proc = subprocess.run([python, "-c", EXPORT_SNIPPET, model, str(out), ",".join(CLASSES)], cwd=cwd,
                          capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"export in {cwd} failed:\n{proc.stderr[-3000:]}")
    files = sizes(out)
    return {"files": files, "total_bytes": sum(files.values()), "export_s": time.perf_counter() - t0}


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB ({n / 2**20:.0f} MiB)"


def markdown(r: Dict) -> str:
    now = r["bundle"]
    lines = [f"# Bundle size ({r['model']}, random-init, text tower, both backends)", "",
             f"Measured {r['date']} on {r['machine']}; `{r['command']}`. MB = 10^6 bytes, MiB = 2^20.", "",
             "| bundle | size on disk |", "| --- | --- |"]
    if r.get("baseline"):
        lines.append(f"| before weights.data (the code at {r['baseline']['revision']}), measured | "
                     f"{mb(r['baseline']['total_bytes'])} |")
    lines += [f"| each graph its own copy (computed: less weights.data, plus every graph's referenced bytes) | "
              f"{mb(r['unshared_bytes'])} |",
              f"| now: frozen weights once in weights.data | {mb(now['total_bytes'])} |",
              f"| `flora-export strip --backend step` (Raspberry Pi, Jetson) | "
              f"{mb(r['strip']['step']['total_bytes'])} |",
              f"| `flora-export strip --backend ort-training` (x86-64 with onnxruntime-training) | "
              f"{mb(r['strip']['ort-training']['total_bytes'])} |", "",
              "Files of the bundle now:", "", "| file | size |", "| --- | --- |"]
    lines += [f"| {name} | {mb(n)} |" for name, n in now["files"].items()]
    if r.get("baseline"):
        lines += ["", "Files before:", "", "| file | size |", "| --- | --- |"]
        lines += [f"| {name} | {mb(n)} |" for name, n in r["baseline"]["files"].items()]
    shared = r["shared_data"]
    lines += ["", f"weights.data: {mb(shared['stored_bytes'])} stored for {mb(shared['referenced_bytes'])} "
              f"referenced by {', '.join(shared['graphs'])}. The ORT training checkpoint keeps its own copy of "
              "the frozen text tower (a flatbuffer its training and eval sessions share, not ONNX external data)."]
    return "\n".join(lines) + "\n"


def _git_revision(folder: Path) -> str:
    proc = subprocess.run(["git", "-C", str(folder), "log", "-1", "--format=%h"], capture_output=True, text=True)
    return proc.stdout.strip() or str(folder)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--baseline", type=Path, help="a checkout of older code to export with as well")
    p.add_argument("--baseline-python", default=None, help="its Python (default: its .venv/bin/python)")
    p.add_argument("--baseline-model", default=None,
                   help="the model's name for the older code (default: clip-vitb32 for ViT-B-32, else --model)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    from bench.train_step import cpu_name
    from flora.edge.bundle import load_manifest
    from flora.export.strip import strip_bundle

    command = " ".join(["python -m bench.bundle_size", *(sys.argv[1:] if argv is None else argv)])
    report: Dict = {"model": a.model, "date": time.strftime("%Y-%m-%d"), "command": command,
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                               f"{cpu_name()}", "loadavg": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="flora-bench-size-") as tmp:
        now = Path(tmp) / "now"
        print(f"exporting {a.model} with this checkout ...", flush=True)
        report["bundle"] = export(a.model, now, ROOT, sys.executable)
        shared = load_manifest(now).onnx["shared_data"]
        report["shared_data"] = shared
        report["unshared_bytes"] = (report["bundle"]["total_bytes"] - report["bundle"]["files"]["weights.data"]
                                    + shared["referenced_bytes"])
        report["strip"] = {}
        for backend in ("step", "ort-training"):
            out = Path(tmp) / f"strip-{backend}"
            strip_bundle(now, out, [backend], say=lambda m: None)
            files = sizes(out)
            report["strip"][backend] = {"files": files, "total_bytes": sum(files.values())}
        baseline: Optional[Path] = a.baseline
        if baseline is not None:
            print(f"exporting {a.model} with {baseline} ...", flush=True)
            python = a.baseline_python or str(baseline / ".venv" / "bin" / "python")
            name = a.baseline_model or ("clip-vitb32" if a.model == "ViT-B-32" else a.model)
            report["baseline"] = {**export(name, Path(tmp) / "before", baseline, python),
                                  "revision": _git_revision(baseline), "model": name}
    stem = "bundle_size" if a.model == "ViT-B-32" else f"bundle_size_{a.model}"
    write_report(a.out, stem, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
