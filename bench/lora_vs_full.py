"""LoRA vs full fine-tuning of CLIP: time per epoch and peak memory, in one run (FLORA's headline claim).

    python -m bench.lora_vs_full                     # ViT-B/32 random-init, batch 32, 1,000 images
    python -m bench.lora_vs_full --model clip-tiny   # the toy model (writes lora_vs_full_clip-tiny.*)

Arms, each in its own process (bench/step_worker.py, the workers and VmHWM peaks of bench/train_step.py):
text-mode LoRA (ONNX Runtime training and the portable step graph, features cached: a real epoch over 1,000
cached feature vectors; the image encoder's one-off cost per image measured apart), vision-mode LoRA (ONNX
Runtime), the same two LoRA modes in PyTorch eager, and full fine-tuning of every CLIP weight in PyTorch
(bench/full_finetune.py: AdamW over both towers, the same cross-entropy over the class prompts). Pixel arms
time a few steps (median) and report step time x steps per epoch (ceil(images / batch)), since a full epoch
of them takes minutes on 2 cores. Also: the text-mode step's FLOPs, counted from the MatMul shapes of the
step backend's train_step.onnx, over its measured step time, against numpy's float32 matmul peak measured in
the same run. Writes bench/results/lora_vs_full[_MODEL].json and .md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from bench.report_files import write_report
from bench.train_step import RESULTS, cpu_name, export, run_json, worker

#: FLORA (Nguyen, Munoz, Jannesari, 2024): LoRA vs full fine-tuning, "up to" figures.
PAPER = {"time_ratio": 34.72, "memory_ratio": 2.47}

SGEMM_SNIPPET = """
import json, os, sys, time
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = sys.argv[1]
import numpy as np
best = {}
for n in [int(s) for s in sys.argv[2].split(",")]:
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    a @ b
    times = []
    for _ in range(int(sys.argv[3])):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    best[n] = 2 * n ** 3 / min(times) / 1e9
print(json.dumps({"gflops_by_size": best, "peak_gflops": max(best.values())}))
"""

TORCH_FLOPS_SNIPPET = """
import json, sys
from bench.full_finetune import lora_step_flops
print(json.dumps({"flops": lora_step_flops(sys.argv[1], sys.argv[2], int(sys.argv[3]))}))
"""


def sgemm_peak(threads: int, sizes: Iterable[int] = (1024, 2048, 4096), repeats: int = 5) -> Dict:
    """numpy's float32 matmul, best of `repeats` per square size, in a fresh process with `threads` BLAS threads."""
    return run_json([sys.executable, "-c", SGEMM_SNIPPET, str(threads), ",".join(map(str, sizes)), str(repeats)])


def _dims(value, sizes: Dict[str, int]) -> Optional[List[int]]:
    shape = value.type.tensor_type.shape
    if not value.type.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        elif d.dim_param in sizes:
            dims.append(sizes[d.dim_param])
        else:
            return None
    return dims


def matmul_flops(onnx_path: Path, batch: int, batch_dim: str = "batch") -> Dict:
    """FLOPs of one run of an ONNX graph's MatMul and Gemm nodes (2 x M x K x N x broadcast batch), read from
    the graph's shapes (inferred where the exporter left none) with the `batch_dim` dimension set to `batch`.
    `unknown` counts the nodes whose shapes could not be resolved (their FLOPs are missing from `flops`)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    if not model.graph.value_info:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = model.graph
    sizes = {batch_dim: batch}
    shapes = {v.name: _dims(v, sizes) for v in [*g.input, *g.value_info, *g.output]}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    flops, nodes, unknown = 0, 0, 0
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        a, b = (shapes.get(name) for name in node.input[:2])
        if not a or not b:
            unknown += 1
            continue
        if node.op_type == "Gemm":
            attrs = {at.name: at.i for at in node.attribute}
            m, k = (a[1], a[0]) if attrs.get("transA") else (a[0], a[1])
            n = b[0] if attrs.get("transB") else b[1]
            flops += 2 * m * k * n
        else:
            a2, b2 = (a if len(a) > 1 else [1, *a]), (b if len(b) > 1 else [*b, 1])
            lead_a, lead_b = a2[:-2], b2[:-2]
            width = max(len(lead_a), len(lead_b))
            lead_a, lead_b = [1] * (width - len(lead_a)) + lead_a, [1] * (width - len(lead_b)) + lead_b
            flops += 2 * math.prod(max(x, y) for x, y in zip(lead_a, lead_b)) * a2[-2] * a2[-1] * b2[-1]
        nodes += 1
    return {"flops": flops, "matmul_nodes": nodes, "unknown": unknown}


def epoch_summary(report: Dict) -> Dict:
    """Seconds per epoch and peak RSS of every arm, and full fine-tuning's ratios over each LoRA arm."""
    images, batch = report["images"], report["batch"]
    steps = math.ceil(images / batch)
    w = report["workers"]
    per_image = w["features"]["per_image_s"]
    arms = {
        "text LoRA, ONNX Runtime": (w["text_ort"]["epoch_cached_s"], w["text_ort"]["train_peak_mb"], "measured epoch"),
        "text LoRA, step graph": (w["text_step"]["epoch_cached_s"], w["text_step"]["train_peak_mb"], "measured epoch"),
        "text LoRA, PyTorch": (w["text_torch"]["step_s"] * steps, w["text_torch"]["train_peak_mb"], "step x steps"),
        "vision LoRA, ONNX Runtime": (w["vision_ort"]["step_s"] * steps, w["vision_ort"]["train_peak_mb"],
                                      "step x steps"),
        "vision LoRA, PyTorch": (w["vision_torch"]["step_s"] * steps, w["vision_torch"]["train_peak_mb"],
                                 "step x steps"),
        "full fine-tuning, PyTorch": (w["full"]["step_s"] * steps, w["full"]["train_peak_mb"], "step x steps"),
    }
    full_s, full_mb, _ = arms["full fine-tuning, PyTorch"]
    rows = [{"arm": k, "epoch_s": s, "peak_mb": mb, "how": how, "full_over_time": full_s / s,
             "full_over_memory": full_mb / mb} for k, (s, mb, how) in arms.items()]
    first = arms["text LoRA, ONNX Runtime"][0] + per_image * images
    return {"steps_per_epoch": steps, "rows": rows, "feature_s_per_image": per_image,
            "text_first_epoch_s": first, "full_over_text_first_epoch": full_s / first}


def markdown(report: Dict) -> str:
    s = report["summary"]
    f = report["flops"]
    lines = [f"# LoRA vs full fine-tuning ({report['model']}, random-init, batch {report['batch']}, "
             f"{report['images']} images, {report['threads']} threads)", "",
             f"Measured {report['date']} on {report['machine']}; `{report['command']}`; load average "
             f"{', '.join(f'{x:.1f}' for x in report['loadavg_start'])} at the start, "
             f"{', '.join(f'{x:.1f}' for x in report['loadavg_end'])} at the end.", "",
             f"Text mode trains on cached image features: its epoch is a real one over {report['images']} cached "
             f"feature vectors; computing them is a one-off {1e3 * s['feature_s_per_image']:.1f} ms per image "
             "(image encoder, ONNX Runtime, batch 32), reported apart. Pixel arms are the median step time of a few "
             f"steps x {s['steps_per_epoch']} steps per epoch (ceil({report['images']}/{report['batch']})), not a "
             "full epoch. Peak RSS is the whole process over the training steps (VmHWM).", "",
             "| arm | epoch | how | peak RSS | full FT / this, time | full FT / this, memory |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in s["rows"]:
        lines.append(f"| {r['arm']} | {r['epoch_s']:.1f} s | {r['how']} | {r['peak_mb']:.0f} MiB | "
                     f"{r['full_over_time']:.2f}x | {r['full_over_memory']:.2f}x |")
    lines += ["", f"Text mode's first epoch with the feature pass: {s['text_first_epoch_s']:.1f} s "
              f"(full FT / that = {s['full_over_text_first_epoch']:.2f}x); later epochs reuse the cache.", "",
              f"Paper (FLORA): up to {PAPER['time_ratio']}x faster and {PAPER['memory_ratio']}x less memory than "
              "full fine-tuning.", "",
              "## Text-mode step, achieved GFLOP/s", "",
              f"train_step.onnx (step backend, batch {report['batch']}): {f['step_graph']['matmul_nodes']} MatMul/Gemm "
              f"nodes, {f['step_graph']['flops'] / 1e9:.2f} GFLOP a step ({f['step_graph']['unknown']} nodes without "
              f"shapes); PyTorch's FlopCounterMode over the same LoRA step (forward + backward) counts "
              f"{f['torch_counter'] / 1e9:.2f} GFLOP. AdamW and the element-wise ops are not counted.", "",
              "| step | time | GFLOP/s | of the sgemm peak |", "| --- | --- | --- | --- |"]
    for name, v in f["achieved"].items():
        lines.append(f"| {name} | {1e3 * v['step_s']:.1f} ms | {v['gflops']:.1f} | {100 * v['of_peak']:.1f} % |")
    peak = report["sgemm"]
    lines += ["", f"numpy float32 matmul, {report['threads']} threads, best of 5: "
              + ", ".join(f"n={n}: {g:.1f}" for n, g in peak["gflops_by_size"].items())
              + f" GFLOP/s (peak {peak['peak_gflops']:.1f})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="clip-vitb32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--steps", type=int, default=3, help="timed steps of the pixel arms (text arms: 10)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sgemm-sizes", default="1024,2048,4096")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    command = " ".join(["python -m bench.lora_vs_full", *(sys.argv[1:] if argv is None else argv)])
    report: Dict = {"model": a.model, "batch": a.batch, "images": a.images, "threads": a.threads,
                    "date": time.strftime("%Y-%m-%d"), "command": command, "loadavg_start": os.getloadavg(),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                               f"{cpu_name()}", "paper": PAPER, "workers": {}, "export": {}}
    w = report["workers"]
    with tempfile.TemporaryDirectory(prefix="flora-lora-vs-full-") as tmp:
        bundles = {}
        for tower, backend in (("text", "ort-training"), ("text", "step"), ("vision", "ort-training")):
            out = Path(tmp) / f"{tower}-{backend}"
            print(f"exporting {a.model} ({tower} tower, {backend}) ...", flush=True)
            report["export"][f"{tower}/{backend}"] = export(a.model, tower, backend, out)
            bundles[tower, backend] = out
        text, step, vision = bundles["text", "ort-training"], bundles["text", "step"], bundles["vision", "ort-training"]
        pixel = ("--warmup", "1")
        plan = [("text_ort", "ort-training", text, 10, ()), ("text_step", "step", step, 10, ()),
                ("text_torch", "torch", text, 10, ()), ("features", "features", text, a.steps, pixel),
                ("vision_ort", "ort-training", vision, a.steps, pixel),
                ("vision_torch", "torch", vision, a.steps, pixel), ("full", "full", vision, a.steps, pixel)]
        for key, what, bundle, steps, extra in plan:
            print(f"  {key} ...", flush=True)
            w[key] = worker(what, bundle, a.batch, steps, a.threads, *extra)
        for key in ("text_ort", "text_step"):  # a real epoch over `images` cached features
            w[key]["epoch_cached_s"] = w[key].pop("epoch_1000_cached_s") * a.images / 1000
        print("  sgemm peak ...", flush=True)
        report["sgemm"] = sgemm_peak(a.threads, [int(n) for n in a.sgemm_sizes.split(",")])
        flops = {"step_graph": matmul_flops(step / "train_step.onnx", a.batch),
                 "torch_counter": run_json([sys.executable, "-c", TORCH_FLOPS_SNIPPET, str(text), "text",
                                            str(a.batch)])["flops"]}
    peak = report["sgemm"]["peak_gflops"]
    flops["achieved"] = {
        name: {"step_s": w[key]["step_s"], "gflops": flops["step_graph"]["flops"] / w[key]["step_s"] / 1e9,
               "of_peak": flops["step_graph"]["flops"] / w[key]["step_s"] / 1e9 / peak}
        for name, key in (("step graph (its own FLOPs)", "text_step"),
                          ("ONNX Runtime training (the same step's FLOPs)", "text_ort"))}
    report["flops"] = flops
    report["loadavg_end"] = os.getloadavg()
    report["summary"] = epoch_summary(report)
    stem = "lora_vs_full" if a.model == "clip-vitb32" else f"lora_vs_full_{a.model}"
    write_report(a.out, stem, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
