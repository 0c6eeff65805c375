"""flora-agent predict's throughput against the image encoder alone, fp32 and int8, and its peak memory.

    python -m bench.predict                       # random-init ViT-B/32, 256 JPEG photos, batch 32, 2 threads
    python -m bench.predict --model clip-tiny --images 512

Both are measured in one process, alternating (encoder, predict, encoder, predict, ...) so that a
busy machine slows both alike; the figure is the median of the rounds. `encoder` is the bundle's
image encoder on pixels already decoded in memory: an upper bound for any classifier built on it.
`predict` is what `flora-agent predict` runs: files decoded and preprocessed (one batch ahead on a
worker thread), the image encoder, the class head computed once for the adapter, the softmax and
the top-k rows written out. Its peak resident set comes from a fresh process running the command
itself. Writes bench/results/predict[_MODEL].json and .md.
"""

from __future__ import annotations

import argparse
import io
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
CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def export(model: str, out: Path) -> None:
    from flora.export.pipeline import ExportOptions, export_bundle

    export_bundle(ExportOptions(preset=model, classes=CLASSES, out=out, random_init=True,
                                backends=("ort-training",), image_encoder_int8=True), say=lambda m: None)


def photos(folder: Path, n: int, seed: int = 0) -> List[Path]:
    """`n` JPEG photos, 640x480: smooth colour fields with shapes and noise (they compress as photos do)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(-1, 1, 3)
        base = np.stack([128 + 100 * np.sin(a * xx / 90 + b * yy / 70 + k + c) for k in range(3)], axis=-1)
        img = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = rng.integers(0, 560), rng.integers(0, 400)
            draw.ellipse([x0, y0, x0 + rng.integers(20, 80), y0 + rng.integers(20, 80)],
                         fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        path = folder / f"{i:05d}.jpg"
        img.save(path, quality=88)
        paths.append(path)
    return paths


def rates(bundle_dir: Path, paths: List[Path], batch: int, threads: int, rounds: int) -> Dict:
    """Images per second, fp32 and int8, alternating in this process: the image encoder on pixels in memory,
    the image features of the files (decode + preprocess + encoder, as an agent computes them), predict."""
    from flora.edge.bundle import load_bundle
    from flora.edge.commands import PredictionWriter
    from flora.edge.features import image_features
    from flora.edge.predict import Predictor, choose_adapter, softmax
    from flora.edge.preprocess import preprocess_batch

    bundle = load_bundle(bundle_dir, backends=())
    tensors = choose_adapter(bundle).tensors
    pixels = preprocess_batch(paths, bundle.manifest.preprocess)
    out: Dict[str, List[float]] = {}
    for int8 in (False, True):
        predictor = Predictor(bundle, tensors, threads=threads, int8=int8)
        encoder = predictor.encoder
        encoder(pixels[:batch])  # warm-up: the first run plans memory
        tag = "int8" if int8 else "fp32"
        for _ in range(rounds):
            t0 = time.perf_counter()
            for i in range(0, len(pixels), batch):
                encoder(pixels[i:i + batch])
            out.setdefault(f"encoder_{tag}", []).append(len(pixels) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            image_features(bundle, paths, None, encoder=encoder, batch_size=batch)
            out.setdefault(f"features_{tag}", []).append(len(paths) / (time.perf_counter() - t0))
            sink = io.StringIO()
            writer = PredictionWriter(sink, "jsonl", bundle.manifest.classes, 3, 40)
            t0 = time.perf_counter()
            for idx, logits in predictor.predict_paths(paths, batch):
                for i, probs in zip(idx, softmax(logits)):
                    writer.write(str(paths[i]), probs)
            out.setdefault(f"predict_{tag}", []).append(len(paths) / (time.perf_counter() - t0))
            assert len(sink.getvalue().splitlines()) == len(paths)
        del predictor, encoder
    return {k: {"median": statistics.median(v), "all": v} for k, v in out.items()}


PEAK_SNIPPET = """
import sys
from flora.edge.cli import main
try:
    code = main(sys.argv[2:])
finally:
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(sys.argv[1], "w") as f:
        f.write(str(hwm / 1024.0))
sys.exit(code)
"""


def peak_rss(bundle_dir: Path, folder: Path, batch: int, threads: int, int8: bool) -> Dict:
    """`flora-agent predict` in a fresh process: its wall time and its own peak RSS (VmHWM at exit)."""
    argv = ["predict", "--bundle", str(bundle_dir), str(folder), "--format", "jsonl", "--batch-size", str(batch),
            "--threads", str(threads), *(["--image-encoder-int8"] if int8 else [])]
    with tempfile.NamedTemporaryFile(suffix=".txt") as peak:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PEAK_SNIPPET, peak.name, *argv], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"flora-agent {' '.join(argv)} failed: {proc.stderr[-2000:]}")
        return {"peak_rss_mb": float(Path(peak.name).read_text()), "wall_s": wall,
                "command": "flora-agent " + " ".join(argv)}


def markdown(r: Dict) -> str:
    m = r["rates"]
    lines = [f"# flora-agent predict vs the image encoder alone ({r['model']}, random-init, {r['threads']} threads)",
             "", f"Measured {r['date']} on {r['machine']} (load average {r['loadavg_before'][0]:.1f} before, "
             f"{r['loadavg_after'][0]:.1f} after); `{r['command']}`. {r['images']} JPEG photos 640x480, batch "
             f"{r['batch']}, median of {r['rounds']} alternating rounds.", "",
             "- encoder: the image encoder on pixels already decoded and preprocessed in memory;",
             "- features: the image features of the files as an agent computes them (decode, preprocess, encoder);",
             "- predict: `flora-agent predict`'s loop on the files (decoding a batch ahead on a thread, encoder, "
             "class head, softmax, top-3 rows).", "",
             "| encoder | encoder (pixels) | features (files) | predict (files) | predict / features | "
             "predict / encoder | predict peak RSS |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for tag in ("fp32", "int8"):
        enc, feat, pred = (m[f"{k}_{tag}"]["median"] for k in ("encoder", "features", "predict"))
        lines.append(f"| {tag} | {enc:.1f} img/s | {feat:.1f} img/s | {pred:.1f} img/s | {pred / feat:.3f} | "
                     f"{pred / enc:.3f} | {r['rss'][tag]['peak_rss_mb']:.0f} MiB |")
    lines += ["", f"int8 / fp32 image encoder on pixels: "
              f"{m['encoder_int8']['median'] / m['encoder_fp32']['median']:.2f}x images/s.", "",
              "Peak RSS: `flora-agent predict` over the same photos in a fresh process (VmHWM at exit).", "",
              "Goal (issue 13): predict >= 0.95x the image encoder alone (fp32)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    command = " ".join(["python -m bench.predict", *(sys.argv[1:] if argv is None else argv)])
    from bench.train_step import cpu_name

    report: Dict = {"model": a.model, "threads": a.threads, "batch": a.batch, "images": a.images, "rounds": a.rounds,
                    "date": time.strftime("%Y-%m-%d"), "command": command, "loadavg_before": os.getloadavg(),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                               f"{cpu_name()}"}
    with tempfile.TemporaryDirectory(prefix="flora-bench-predict-") as tmp:
        bundle = Path(tmp) / "bundle"
        print(f"exporting {a.model} (random-init, with the int8 image encoder) ...", flush=True)
        export(a.model, bundle)
        paths = photos(Path(tmp) / "photos", a.images)
        print("timing the image encoder and predict, alternating ...", flush=True)
        report["rates"] = rates(bundle, paths, a.batch, a.threads, a.rounds)
        report["rss"] = {tag: peak_rss(bundle, Path(tmp) / "photos", a.batch, a.threads, tag == "int8")
                         for tag in ("fp32", "int8")}
    report["loadavg_after"] = os.getloadavg()
    stem = "predict" if a.model == "ViT-B-32" else f"predict_{a.model}"
    write_report(a.out, stem, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
