"""The int8 image encoder against fp32: speed, feature agreement on real images, and a federation's accuracy.

    python -m bench.int8                            # random-init ViT-B/32 on scikit-learn's digits
    python -m bench.int8 --model clip-tiny --rounds 10

1. images/s of the fp32 and the int8 image encoder on the same preprocessed digits, alternating in one
   process (median of the rounds);
2. cosine similarity of the two encoders' features over the digits test split (mean and min);
3. two `flora-sim` runs on the same bundle, seed and shards: agents on fp32 features, then agents on
   int8 features (`--image-encoder-int8`); the sim's final held-out accuracy is computed on fp32 test
   features by the aggregator, and `flora-agent evaluate` scores each final global on the test split
   with both encoders.
Writes bench/results/int8[_MODEL].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from bench.report_files import write_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def speed_and_agreement(bundle_dir: Path, paths: List[Path], batch: int, threads: int, rounds: int) -> Dict:
    from flora.edge.bundle import load_bundle
    from flora.edge.features import ImageEncoder
    from flora.edge.preprocess import preprocess_batch

    bundle = load_bundle(bundle_dir, backends=())
    pixels = preprocess_batch(paths, bundle.manifest.preprocess)
    encoders = {"fp32": ImageEncoder(bundle, threads), "int8": ImageEncoder(bundle, threads, int8=True)}
    feats: Dict[str, np.ndarray] = {}
    speed: Dict[str, List[float]] = {"fp32": [], "int8": []}
    timed = pixels[: min(len(pixels), 8 * batch)]
    for tag, enc in encoders.items():
        enc(timed[:batch])  # warm-up
        feats[tag] = np.concatenate([enc(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
    for _ in range(rounds):
        for tag, enc in encoders.items():
            t0 = time.perf_counter()
            for i in range(0, len(timed), batch):
                enc(timed[i:i + batch])
            speed[tag].append(len(timed) / (time.perf_counter() - t0))
    a, b = feats["fp32"], feats["int8"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"images_per_s": {k: statistics.median(v) for k, v in speed.items()}, "images_per_s_all": speed,
            "timed_images": len(timed), "cosine": {"mean": float(cos.mean()), "min": float(cos.min()),
                                                   "images": len(cos)}}


def run(cmd: List[str], timeout: int) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def sim(bundle: Path, out: Path, int8: bool, a: argparse.Namespace) -> Dict:
    cmd = [sys.executable, "-m", "flora.sim.cli", "--bundle", str(bundle), "--dataset", "digits", "--out", str(out),
           "--clients", str(a.clients), "--rounds", str(a.rounds), "--epochs", str(a.epochs), "--seed", "0",
           "--timeout", str(a.timeout), "--round-timeout", str(a.timeout), *(["--image-encoder-int8"] if int8 else [])]
    t0 = time.perf_counter()
    run(cmd, a.timeout + 600)
    report = json.loads((out / "report.json").read_text())
    state = json.loads((out / "aggregator" / "state.json").read_text())
    final = out / "aggregator" / state["global_file"]
    scores = {}
    for tag in ("fp32", "int8"):
        ev = out / f"evaluate-{tag}"
        run([sys.executable, "-m", "flora.edge.cli", "evaluate", "--bundle", str(bundle), "--adapter", str(final),
             "--data", str(out / "test.csv"), "--out", str(ev), *(["--image-encoder-int8"] if tag == "int8" else [])],
            3600)
        scores[tag] = json.loads((ev / "evaluation.json").read_text())["accuracy"]
    history = report.get("rounds") or []
    return {"command": " ".join(cmd[1:]), "wall_s": time.perf_counter() - t0,
            "sim_final_test_accuracy": _final_accuracy(report), "final_global": final.name,
            "evaluate_test_accuracy": scores, "rounds_reported": len(history)}


def _final_accuracy(report: Dict) -> float:
    accuracy = report.get("accuracy", {}).get("federated")
    if isinstance(accuracy, list) and accuracy:
        return float(accuracy[-1])
    raise RuntimeError(f"no federated accuracy in the sim's report: {sorted(report)}")


def markdown(r: Dict) -> str:
    s = r["speed"]
    ips = s["images_per_s"]
    lines = [f"# int8 image encoder vs fp32 ({r['model']}, random-init, {r['threads']} threads)", "",
             f"Measured {r['date']} on {r['machine']} (load average {r['loadavg_before'][0]:.1f} before, "
             f"{r['loadavg_after'][0]:.1f} after); `{r['command']}`.", "",
             "| | fp32 | int8 | int8 / fp32 |", "| --- | --- | --- | --- |",
             f"| image encoder, images/s (batch {r['batch']}, {s['timed_images']} digits, median of "
             f"{r['rounds']} alternating rounds) | {ips['fp32']:.1f} | {ips['int8']:.1f} | "
             f"{ips['int8'] / ips['fp32']:.2f}x |",
             f"| image encoder file | {r['sizes']['fp32'] / 1e6:.1f} MB | {r['sizes']['int8'] / 1e6:.1f} MB | "
             f"{r['sizes']['int8'] / r['sizes']['fp32']:.2f} |", "",
             f"Feature cosine similarity int8 vs fp32 over the {s['cosine']['images']} digits test images: mean "
             f"{s['cosine']['mean']:.5f}, min {s['cosine']['min']:.5f}.", "",
             f"Federation on digits (`flora-sim`, {r['clients']} clients, {r['rounds_total']} rounds, "
             f"{r['epochs']} epochs, seed 0, the same bundle and shards):", "",
             "| agents' features | sim's final test accuracy (aggregator, fp32 test features) | "
             "final global, fp32 test features | final global, int8 test features |",
             "| --- | --- | --- | --- |"]
    for tag in ("fp32", "int8"):
        run_ = r["sim"][tag]
        ev = run_["evaluate_test_accuracy"]
        lines.append(f"| {tag} | {run_['sim_final_test_accuracy']:.4f} | {ev['fp32']:.4f} | {ev['int8']:.4f} |")
    cost = r["accuracy_cost_points"]
    lines += ["", f"Accuracy cost of int8 end to end (int8 training and test features vs fp32 both): "
              f"{cost:+.2f} points. The encoder stays opt-in (`flora-export --image-encoder-int8`, "
              f"`flora-agent --image-encoder-int8`){' because that cost exceeds 1 point' if cost > 1 else ''}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds-timing", dest="rounds_timing", type=int, default=3)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--timeout", type=int, default=5400, help="seconds a sim may run")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    from bench.train_step import cpu_name
    from flora.edge.bundle import IMAGE_ENCODER, IMAGE_ENCODER_INT8
    from flora.edge.ort import has_training_api
    from flora.export.pipeline import ExportOptions, export_bundle
    from flora.sim.datasets import write_digits

    command = " ".join(["python -m bench.int8", *(sys.argv[1:] if argv is None else argv)])
    report: Dict = {"model": a.model, "threads": a.threads, "batch": a.batch, "rounds": a.rounds_timing,
                    "clients": a.clients, "rounds_total": a.rounds, "epochs": a.epochs,
                    "date": time.strftime("%Y-%m-%d"), "command": command, "loadavg_before": os.getloadavg(),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                               f"{cpu_name()}"}
    with tempfile.TemporaryDirectory(prefix="flora-bench-int8-") as tmp:
        data = write_digits(Path(tmp) / "digits", seed=0)
        bundle = Path(tmp) / "bundle"
        print(f"exporting {a.model} with the int8 image encoder ...", flush=True)
        export_bundle(ExportOptions(preset=a.model, classes=list(data.classes), out=bundle, random_init=True,
                                    backends=("ort-training",) if has_training_api() else ("step",),
                                    image_encoder_int8=True), say=lambda m: None)
        report["sizes"] = {"fp32": _encoder_bytes(bundle, IMAGE_ENCODER),
                           "int8": _encoder_bytes(bundle, IMAGE_ENCODER_INT8)}
        paths = [s.path for s in data.test]  # the held-out split: real images neither encoder was tuned on
        print(f"timing both encoders and comparing features on {len(paths)} digits ...", flush=True)
        report["speed"] = speed_and_agreement(bundle, paths, a.batch, a.threads, a.rounds_timing)
        report["sim"] = {}
        for tag in ("fp32", "int8"):
            print(f"flora-sim with {tag} features ...", flush=True)
            report["sim"][tag] = sim(bundle, Path(tmp) / f"sim-{tag}", tag == "int8", a)
    report["accuracy_cost_points"] = 100 * (report["sim"]["fp32"]["evaluate_test_accuracy"]["fp32"]
                                            - report["sim"]["int8"]["evaluate_test_accuracy"]["int8"])
    report["loadavg_after"] = os.getloadavg()
    stem = "int8" if a.model == "ViT-B-32" else f"int8_{a.model}"
    write_report(a.out, stem, report, markdown(report))
    return 0


def _encoder_bytes(bundle: Path, graph: str) -> int:
    """A graph's size with the weights it reads from weights.data."""
    from flora.export.shared_data import used_ranges

    return (bundle / graph).stat().st_size + sum(n for _, n in used_ranges(bundle, [graph]))


if __name__ == "__main__":
    sys.exit(main())
