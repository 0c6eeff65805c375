"""What epsilon a fleet can reach: DP-FedAvg's accounting for fleets of 10 to 10,000 devices.

    python -m bench.dp_epsilon

For each fleet size N, clients per round m, rounds R and target epsilon (at delta = 1e-5, or
1/N^1.1 when that is smaller, the usual "delta below 1/N" rule), the smallest noise multiplier z
that stays within it (flora.broker.accountant.noise_for_epsilon: Google's dp-accounting, PLD), and
what that noise does to the round's average: its standard deviation per coordinate is z*C/m, i.e.
z/m in units of the clip norm C, against an honest device's clipped delta of norm <= C spread over
all coordinates. Also epsilon at fixed z = 1 (the issue's two quoted figures among them). Writes
bench/results/dp_epsilon.json and dp_epsilon.md.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from flora.broker.accountant import RoundEvent, epsilon, noise_for_epsilon

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FLEETS = ((10, (10,)), (100, (10, 100)), (1000, (100, 1000)), (10_000, (100, 1000)))
ROUNDS = (50, 500)
TARGETS = (1.0, 8.0)


def delta_for(n: int) -> float:
    return min(1e-5, 1.0 / n ** 1.1)


def main() -> None:
    t0 = time.time()
    rows = []
    for n, per_round in FLEETS:
        delta = delta_for(n)
        for m in per_round:
            q = m / n
            for rounds in ROUNDS:
                row = {"devices": n, "per_round": m, "q": q, "rounds": rounds, "delta": delta,
                       "epsilon_at_z1": epsilon([RoundEvent(q, 1.0)] * rounds, delta)}
                for target in TARGETS:
                    z = noise_for_epsilon(target, rounds, q, delta)
                    row[f"z_for_eps{target:g}"] = z
                    row[f"noise_std_of_mean_over_C_eps{target:g}"] = z / m
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = {"rows": rows, "accountant": "pld", "seconds": round(time.time() - t0, 1), "loadavg": os.getloadavg(),
           "python": platform.python_version()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dp_epsilon.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# What epsilon a fleet can reach (DP-FedAvg, PLD accountant)", "",
             "`python -m bench.dp_epsilon`. z: noise multiplier (noise std z*C on the sum of clipped deltas); "
             "noise/C: std of the noise on the round's average per coordinate, in units of the clip norm C "
             "(= z / per-round clients). delta = min(1e-5, 1/N^1.1).", "",
             "| devices | per round | rounds | delta | eps at z=1 | z for eps 1 | noise/C at eps 1 | z for eps 8 | "
             "noise/C at eps 8 |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['devices']:,} | {r['per_round']:,} | {r['rounds']} | {r['delta']:.1e} | "
                     f"{r['epsilon_at_z1']:.3g} | {r['z_for_eps1']:.3g} | {r['noise_std_of_mean_over_C_eps1']:.3g} | "
                     f"{r['z_for_eps8']:.3g} | {r['noise_std_of_mean_over_C_eps8']:.3g} |")
    (RESULTS / "dp_epsilon.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'dp_epsilon.md'} in {out['seconds']} s")


if __name__ == "__main__":
    main()
