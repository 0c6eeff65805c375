"""Accuracy under differential privacy on digits: epsilon in {1, 8, inf}, plain LoRA vs FFA-LoRA.

    python -m bench.dp_digits                       # 100 clients, all every round, 30 rounds
    python -m bench.dp_digits --clients 100 --rounds 30 --epochs 5

An in-process federation (bench/inprocess.py: one process, one shared step-graph session, the agents'
training code, the aggregator's strategies and accountant; no MQTT) of `--clients` virtual devices
holding an IID split of scikit-learn's digits (1437 training images: about 14 each at 100 clients),
clip-tiny at random init with LoRA rank 8 on q, k, v, out of the text tower, as plain LoRA and as
FFA-LoRA (A frozen: half the tensors). Per variant:

- epsilon = inf: FedAvg as flora-sim runs it (no clipping, no noise), and DP-FedAvg's clipping alone
  (z = 0), which shows what the clip costs before any noise;
- epsilon = 8 and 1 (delta 1e-5 over all `--rounds` rounds, every client every round unless
  --per-round): DP-FedAvg with the noise multiplier the PLD accountant calibrates for that budget
  (broker.accountant.noise_for_epsilon), the epsilon it charges after every round recorded.

The clip norm C is the median L2 norm of the clients' deltas in one plain round of that variant (the
usual choice; picking it from the data is not itself private, say so when quoting). Writes
bench/results/dp_digits.json and dp_digits.md; the work folder (bundles, data, features) is
runs/bench/ by default.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

from flora.broker.accountant import DPSettings, noise_for_epsilon

from .inprocess import Digits, Setting, export, federate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DELTA = 1e-5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, help="clients asked per round (default: all)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epsilons", default="8,1")
    p.add_argument("--variants", default="lora,ffa")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--out", default="dp_digits")
    args = p.parse_args()
    t_start = time.time()
    digits = Digits(args.work)
    q = (args.per_round or args.clients) / args.clients
    runs = []
    for variant in args.variants.split(","):
        bundle = export(args.work, variant, digits.classes)
        base = dict(clients=args.clients, rounds=args.rounds, per_round=args.per_round, epochs=args.epochs,
                    lr=args.lr)
        print(f"{variant}: calibrating the clip norm (one plain round)", flush=True)
        probe = federate(bundle, digits, Setting(**{**base, "rounds": 1}), log=lambda _m: None)
        clip = probe["median_update_norm"]
        print(f"{variant}: clip norm C = {clip:.4g} (median delta norm of round 1)", flush=True)
        plans = [("inf", "fedavg", {}, None, None),
                 ("inf (clip only)", "dp-fedavg", {"clip": clip, "noise_multiplier": 0.0, "noise_seed": 0},
                  None, 0.0)]
        for eps in (float(e) for e in args.epsilons.split(",")):
            z = noise_for_epsilon(eps, args.rounds, q, DELTA)
            plans.append((f"{eps:g}", "dp-fedavg", {"clip": clip, "noise_multiplier": z, "noise_seed": 0},
                          DPSettings(clip, z, DELTA), z))
        for label, strategy, options, dp_settings, z in plans:
            print(f"{variant}, epsilon {label}: {strategy} {options}", flush=True)
            setting = Setting(**base, strategy=strategy, strategy_options=options, dp=dp_settings)
            t0 = time.time()
            result = federate(bundle, digits, setting)
            runs.append({"variant": variant, "epsilon_target": label, "strategy": strategy, "clip": clip
                         if strategy == "dp-fedavg" else None, "noise_multiplier": z,
                         "noise_std_of_mean_over_C": (z / (args.per_round or args.clients)) if z else None,
                         "adapter_floats": bundle.manifest.adapter_numel,
                         "final_accuracy": result["accuracy"][-1],
                         "last3_mean_accuracy": sum(result["accuracy"][-3:]) / 3,
                         "zero_shot": result["accuracy"][0], "accuracy": result["accuracy"],
                         "epsilon": result["epsilon"], "seconds": round(time.time() - t0, 1)})
            print(f"  -> final {result['accuracy'][-1]:.4f}", flush=True)
    out = {"config": {**vars(args), "work": str(args.work)}, "q": q, "delta": DELTA, "runs": runs,
           "seconds": round(time.time() - t_start, 1), "loadavg": os.getloadavg(),
           "python": platform.python_version(), "cpus": os.cpu_count()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# Digits under DP-FedAvg: {args.clients} clients, {args.per_round or args.clients} per round, "
             f"{args.rounds} rounds, {args.epochs} local epochs", "",
             f"`python -m bench.dp_digits --clients {args.clients} --rounds {args.rounds} --epochs {args.epochs}"
             + (f" --per-round {args.per_round}" if args.per_round else "") + f" --lr {args.lr:g}` "
             "(in-process, bench/inprocess.py). "
             f"delta = {DELTA:g}; clip C = median delta norm of a plain round; noise std z*C on the sum.", "",
             "| adapter | epsilon | z | noise std of the mean / C | final test accuracy | mean of last 3 | "
             "epsilon spent |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        spent = f"{r['epsilon'][-1]:.3g}" if r["epsilon"] else ("inf" if r["strategy"] != "fedavg" else "-")
        lines.append(f"| {r['variant']} ({r['adapter_floats']:,} floats) | {r['epsilon_target']} | "
                     f"{_g(r['noise_multiplier'])} | {_g(r['noise_std_of_mean_over_C'])} | "
                     f"{r['final_accuracy']:.4f} | {r['last3_mean_accuracy']:.4f} | {spent} |")
    lines += ["", f"zero-shot (round 0): {runs[0]['zero_shot']:.4f}. Load average during the run: "
              f"{', '.join(f'{x:.1f}' for x in out['loadavg'])}; {out['seconds']:.0f} s in all."]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _g(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


if __name__ == "__main__":
    main()
