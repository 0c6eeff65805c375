"""FLORA's authors' recipe (`--recipe flora`) against this project's default, on the offline proxy CLIP.

    python -m bench.recipe                       # runs the four flora-sim arms below, then times the steps
    python -m bench.recipe --runs DIR            # reuse DIR/<arm>/report.json and DIR/<arm>/bundle

Arms, all `flora-sim --model clip-proxy --clients 4 --rounds 10 --partition dirichlet:0.5 --seed 0`:
  default           the project's (rank 8 q,k,v,out, AdamW lr 1e-3, CE, 5 epochs of batch 32)
  flora             --recipe flora (rank 2 out, scale 32, Adam lr 5e-5 + L2 0.2, contrastive, 1 epoch of 128)
  flora-steps       --recipe flora --epochs 5 --batch-size 32 (the recipe sized in steps like the default)
  flora-steps-ce    the same with --loss ce (the class-prompt head instead of the arange contrastive loss)
For each: held-out accuracy (round 0, final, best), sequential steps a round, bytes up a round, the
adapter's size, and the time per training step at the arm's batch size with the backend its run used
(median of alternating rounds in one process, one thread, the load average recorded).
Writes bench/results/recipe.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
COMMON = ["--model", "clip-proxy", "--clients", "4", "--rounds", "10", "--partition", "dirichlet:0.5",
          "--dataset", "digits", "--seed", "0"]
ARMS: Dict[str, List[str]] = {
    "default": [],
    "flora": ["--recipe", "flora"],
    "flora-steps": ["--recipe", "flora", "--epochs", "5", "--batch-size", "32"],
    "flora-steps-ce": ["--recipe", "flora", "--epochs", "5", "--batch-size", "32", "--loss", "ce"],
}


def run_arms(runs: Path) -> None:
    for arm, extra in ARMS.items():
        cmd = [sys.executable, "-m", "flora.sim.cli", *COMMON, *extra, "--out", str(runs / arm)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def step_times(bundles: Dict[str, Path], batches: Dict[str, int], rounds: int = 5, steps: int = 10) -> Dict:
    """Median seconds per train step of each arm's bundle at its batch size with the backend its run trained
    with (the bundle's own: ort-training for the default, step for the recipe), arms alternating."""
    from flora.edge.bundle import load_bundle
    from flora.edge.trainers import open_trainer

    rng = np.random.default_rng(0)
    trainers, data = {}, {}
    for arm, path in bundles.items():
        bundle = load_bundle(path)
        trainers[arm] = open_trainer(bundle, "auto", threads=1)
        n = batches[arm]
        data[arm] = (rng.standard_normal((n, bundle.manifest.feature_dim)).astype(np.float32),
                     rng.integers(0, bundle.manifest.num_classes, n).astype(np.int64))
        trainers[arm].set_lr(1e-6)
        trainers[arm].train_step(*data[arm])  # warm-up
    times: Dict[str, List[float]] = {arm: [] for arm in bundles}
    for _ in range(rounds):
        for arm, trainer in trainers.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(*data[arm])
            times[arm].append((time.perf_counter() - t0) / steps)
    return {arm: {"median_s": statistics.median(t), "all_s": t, "batch": batches[arm], "backend": trainers[arm].name}
            for arm, t in times.items()}


def summarise(runs: Path) -> Dict:
    arms = {}
    for arm in ARMS:
        report = json.loads((runs / arm / "report.json").read_text())
        manifest = json.loads((runs / arm / "bundle" / "manifest.json").read_text())
        acc = report["accuracy"]["federated"]
        cfg = report["config"]
        arms[arm] = {
            "command": "flora-sim " + " ".join([*COMMON, *ARMS[arm], "--out", f"RUNS/{arm}"]),
            "zero_shot": acc[0], "final": acc[-1], "best": max(a for a in acc if a is not None), "curve": acc,
            "sequential_steps_per_round": report["steps"]["per_round"]["federated"],
            "client_steps_per_round": report["steps"]["per_round"]["federated_per_client"],
            "bytes_up_per_round": statistics.median(report["bytes"]["up_per_round"]),
            "adapter_floats": sum(int(np.prod(t["shape"])) for t in manifest["trainable"]),
            "lora": manifest["lora"], "optimizer": manifest["optimizer"], "loss": manifest.get("loss", "ce"),
            "epochs": cfg["epochs"], "batch_size": cfg["batch_size"], "lr": cfg["lr"],
            "recipe": manifest.get("recipe"),
        }
    return arms


def markdown(result: Dict) -> str:
    lines = ["# `--recipe flora` vs the default on the proxy CLIP (clip-proxy, digits, 4 clients, Dirichlet 0.5, "
             "10 rounds, seed 0)", "",
             "| arm | LoRA | loss | epochs x batch, lr | steps/round | zero-shot | final | best "
             "| KiB up a round (4 clients) | adapter floats | step ms (its batch, backend) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm, r in result["arms"].items():
        lo = r["lora"]
        scale = lo["alpha"] if lo.get("scaling") == "alpha" else lo["alpha"] / lo["rank"]
        lines.append(
            f"| {arm} | r{lo['rank']} {','.join(lo['targets'])}, scale {scale:g} | {r['loss']} | "
            f"{r['epochs']} x {r['batch_size']}, {r['optimizer']['name']} {r['lr']:g} | "
            f"{r['sequential_steps_per_round']} | {r['zero_shot']:.4f} | {r['final']:.4f} | {r['best']:.4f} | "
            f"{r['bytes_up_per_round'] / 1024:.1f} | {r['adapter_floats']} | "
            f"{1000 * result['step_time'][arm]['median_s']:.2f} ({result['step_time'][arm]['backend']}) |")
    lines += ["", f"load average {result['loadavg']}; commands in recipe.json (`python -m bench.recipe`)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, help="reuse these flora-sim outputs (one folder per arm) instead of running")
    ap.add_argument("--out", type=Path, default=RESULTS / "recipe")
    args = ap.parse_args()
    runs = args.runs or ROOT / "runs" / "bench-recipe"
    if args.runs is None:
        run_arms(runs)
    arms = summarise(runs)
    timing = step_times({a: runs / a / "bundle" for a in arms}, {a: arms[a]["batch_size"] for a in arms})
    result = {"arms": arms, "step_time": timing, "loadavg": [round(x, 2) for x in os.getloadavg()],
              "cpus": os.cpu_count(), "step_threads": 1}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
