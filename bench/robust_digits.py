"""Robust aggregation against one poisoned device among ten, on digits.

    python -m bench.robust_digits                          # in-process harness, 3 seeds
    python -m bench.robust_digits --harness sim --seeds 1  # the same through flora-sim (MQTT, processes)

For each strategy (fedavg, norm-bound, median, trimmed-mean) and each condition (honest; one attacker
with sign-flip; one with scale:100), the final held-out test accuracy after `--rounds` rounds, per seed
and as mean ± sd. The goal (issue 16): with one attacker among ten, a robust strategy's final accuracy
within 2 points of the honest run, and FedAvg's loss shown for contrast. norm-bound's max_norm is the
median delta norm of one honest FedAvg round (what an operator would measure on a pilot); trimmed-mean
trims 1 of 10 at each end (trim 0.1). The attacker of each seed is `sim.attacks.choose_attackers`'s.

`--harness inprocess` (bench/inprocess.py): ten virtual clients in one process sharing one step-graph
session, the agents' training code and the aggregator's strategies, no MQTT; `--harness sim`: the real
flora-sim (mosquitto, the aggregator and ten agent processes, the attacker as flora.sim.poisoned_agent).
Writes bench/results/robust_digits[_sim].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
STRATEGIES = ("fedavg", "norm-bound", "median", "trimmed-mean")
CONDITIONS = ("honest", "sign-flip", "scale:100")


def options_for(strategy: str, max_norm: float) -> Dict[str, str]:
    return {"norm-bound": {"max_norm": f"{max_norm:.6g}"}, "trimmed-mean": {"trim": "0.1"}}.get(strategy, {})


def inprocess_runner(args):
    from flora.sim.attacks import choose_attackers

    from .inprocess import Digits, Setting, export, federate

    digits = Digits(args.work)
    bundle = export(args.work, "lora", digits.classes)
    probe = federate(bundle, digits, Setting(clients=args.clients, rounds=1, epochs=args.epochs, lr=args.lr),
                     log=lambda _m: None)
    max_norm = probe["median_update_norm"]

    def run(strategy: str, condition: str, seed: int) -> float:
        attack = None if condition == "honest" else condition
        setting = Setting(clients=args.clients, rounds=args.rounds, epochs=args.epochs, lr=args.lr, seed=seed,
                          strategy=strategy, strategy_options=options_for(strategy, max_norm), attack=attack,
                          attackers=choose_attackers(args.clients, 1, seed) if attack else [])
        return federate(bundle, digits, setting, log=lambda _m: None)["accuracy"][-1]

    return run, max_norm


def sim_runner(args):
    from flora.edge.adapter import decode
    from flora.edge.dp import delta_norm
    from flora.sim.run import SimConfig
    from flora.sim.run import run as sim_run

    out = args.work / "robust-sim"
    sim_run(SimConfig(clients=args.clients, rounds=1, epochs=args.epochs, lr=args.lr, out=out / "probe",
                      backend="step"), say=lambda _m: None)
    # one honest round: each agent's stored update (its outbox) against the initial adapter
    norms = []
    start = decode((out / "probe" / "bundle" / "adapter.safetensors").read_bytes()).as_float32()
    for outbox in sorted((out / "probe" / "clients").glob("client-*/state/outbox*.safetensors")):
        norms.append(delta_norm(decode(outbox.read_bytes()).as_float32(), start))
    max_norm = statistics.median(norms) if norms else 1.0

    def run(strategy: str, condition: str, seed: int) -> float:
        attack = None if condition == "honest" else condition
        cfg = SimConfig(clients=args.clients, rounds=args.rounds, epochs=args.epochs, lr=args.lr, seed=seed,
                        out=out / f"{strategy}-{condition.replace(':', '')}-seed{seed}", backend="step",
                        strategy=strategy, strategy_options=tuple(f"{k}={v}" for k, v in
                                                                  options_for(strategy, max_norm).items()),
                        malicious=1 if attack else 0, attack=attack)
        return sim_run(cfg, say=lambda _m: None)["accuracy"]["federated"][-1]

    return run, max_norm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--harness", choices=["inprocess", "sim"], default="inprocess")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--conditions", default=",".join(CONDITIONS))
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    args = p.parse_args()
    t0 = time.time()
    run, max_norm = (inprocess_runner if args.harness == "inprocess" else sim_runner)(args)
    results: Dict[str, Dict[str, List[float]]] = {}
    for strategy in args.strategies.split(","):
        for condition in args.conditions.split(","):
            accs = []
            for seed in range(args.seeds):
                t = time.time()
                accs.append(run(strategy, condition, seed))
                print(f"{strategy} {condition} seed {seed}: {accs[-1]:.4f} ({time.time() - t:.0f} s)", flush=True)
            results.setdefault(strategy, {})[condition] = accs
    name = "robust_digits" + ("" if args.harness == "inprocess" else "_sim")
    out = {"config": {**vars(args), "work": str(args.work)}, "norm_bound_max_norm": max_norm, "final_accuracy": results,
           "seconds": round(time.time() - t0, 1), "loadavg": os.getloadavg(), "python": platform.python_version()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    honest_fedavg = statistics.mean(results.get("fedavg", {}).get("honest", [float("nan")]))
    conditions = args.conditions.split(",")
    lines = [f"# One attacker among {args.clients} clients on digits ({args.harness} harness)", "",
             f"`python -m bench.robust_digits --harness {args.harness} --rounds {args.rounds} --epochs {args.epochs} "
             f"--lr {args.lr:g} --seeds {args.seeds}`: final test accuracy after {args.rounds} rounds, mean ± sd over "
             f"{args.seeds} seed(s) (the attacker is one of the ten, drawn per seed). "
             f"norm-bound max_norm = {max_norm:.4g}; "
             "trimmed-mean trim 0.1. The last columns: each attacked run's mean minus its own strategy's honest mean, "
             "and minus FedAvg's honest mean.", "",
             "| strategy | " + " | ".join(conditions) + " | " +
             " | ".join(f"{c} vs own honest | {c} vs FedAvg honest" for c in conditions if c != "honest") + " |",
             "|---|" + "---:|" * (len(conditions) + 2 * (len(conditions) - 1))]
    for strategy, by in results.items():
        own = statistics.mean(by.get("honest", [float("nan")]))
        cells = [_mean_sd(by[c]) for c in conditions]
        diffs = []
        for c in conditions:
            if c != "honest":
                m = statistics.mean(by[c])
                diffs += [f"{100 * (m - own):+.1f} pt", f"{100 * (m - honest_fedavg):+.1f} pt"]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " | " + " | ".join(diffs) + " |")
    lines += ["", f"Load average at the end: {', '.join(f'{x:.1f}' for x in out['loadavg'])}; "
              f"{out['seconds']:.0f} s in all."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _mean_sd(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


if __name__ == "__main__":
    main()
