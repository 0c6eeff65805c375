"""flora-sim's report: report.json, the figure, the comparison of the methods, and the printed summary.

`accuracy[method][0]` is round 0 (before training) and `[r]` the accuracy after round r. Beside
the curves the report says how many sequential optimizer steps each method takes a round
(`steps`), so that federated and centralised training can be compared at equal epochs (what each
client runs) or equal steps, and what the comparison is: the final value, the mean of the last
`window` rounds (the converged value once the curves are flat), whether each curve plateaued, and
the rounds federated learning needs to reach 95 % of centralised training's plateau.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from flora.broker.report import legend_below, plot_cumulative_mb, plot_epsilon
from flora.broker.schedule import Plateau

Say = Callable[[str], None]

#: the methods the summary lists, in its order, with the label it prints
LABELS = {
    "federated": "federated LoRA (FedAvg)",
    "centralised_equal_steps": "centralised LoRA, equal steps",
    "centralised": "centralised LoRA, equal epochs",
    "local_only": "local-only LoRA (mean)",
}
#: rounds averaged for the converged value
WINDOW = 10
#: rounds-to-target: this fraction of centralised training's plateau
TARGET_FRACTION = 0.95


def last_mean(curve: Sequence[Optional[float]], window: int) -> Optional[float]:
    """Mean of the last `window` values after round 0 (fewer if the run was shorter); None if any is unknown."""
    tail = list(curve[1:])[-window:]
    if not tail or any(v is None for v in tail):
        return None
    return float(np.mean(tail))


def rounds_to(curve: Sequence[Optional[float]], target: float) -> Optional[int]:
    """The first round r >= 1 after which `curve` reaches `target`, or None."""
    for r, v in enumerate(curve):
        if r >= 1 and v is not None and v >= target:
            return r
    return None


def comparison(accuracy: Dict, window: int = WINDOW) -> Dict:
    """Final and last-`window` means per method, plateau flags, and rounds to 95 % of centralised's plateau."""
    curves = {m: accuracy[m] for m in LABELS if m in accuracy}
    rounds = len(accuracy["federated"]) - 1
    w = min(window, rounds)
    out: Dict = {
        "window": w,
        "final": {m: c[-1] for m, c in curves.items()},
        "last_mean": {m: last_mean(c, w) for m, c in curves.items()},
        "plateaued": {m: Plateau(window=max(1, w // 2)).reached(c[1:]) if rounds >= 2 else False
                      for m, c in curves.items()},
    }
    central = [out["last_mean"].get(m) for m in ("centralised", "centralised_equal_steps")]
    central = [v for v in central if v is not None]
    if central:
        target = TARGET_FRACTION * max(central)
        out["target"] = {"accuracy": target, "rule": f"{TARGET_FRACTION:.0%} of the higher centralised "
                                                     f"mean of the last {w} rounds"}
        out["rounds_to_target"] = {m: rounds_to(c, target) for m, c in curves.items()}
    return out


def steps_x(report: Dict, method: str) -> Optional[List[float]]:
    """Sequential optimizer steps of `method` after each round (x = 0 before training), or None."""
    per_round = report.get("steps", {}).get("per_round", {})
    s = per_round.get(method)
    if isinstance(s, dict):  # local-only: per client; the curve is their mean
        s = float(np.mean(list(s.values()))) if s else None
    if s is None:
        return None
    return [r * float(s) for r in range(len(report["accuracy"][method]))]


# -- writing ------------------------------------------------------------------------------------
def write_report(out: Path, report: Dict, say: Say, plot_x: str = "rounds") -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: wrote report.json only (pip install 'flora-edge[sim]')")
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    plot_accuracy(ax, report, plot_x)
    plot_bytes(bx, report)
    if plot_x == "rounds":
        bx.set_xlim(ax.get_xlim())  # the same x for a round in both panels
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)


STYLE = {"federated": ("o", "federated LoRA (FedAvg)"), "centralised": ("s", "centralised LoRA, equal epochs"),
         "centralised_equal_steps": ("D", "centralised LoRA, equal steps"),
         "local_only": ("^", "local-only LoRA (mean)")}


def plot_accuracy(ax, report: Dict, plot_x: str = "rounds") -> None:
    """Accuracy per method against rounds (x = 0 before training .. R after round R) or sequential steps."""
    acc = report["accuracy"]
    for method, (marker, label) in STYLE.items():
        curve = acc.get(method)
        if curve is None:
            continue
        xs = steps_x(report, method) if plot_x == "steps" else list(range(len(curve)))
        if xs is None:
            continue
        first = 0 if curve[0] is not None else 1
        ax.plot(xs[first:], curve[first:], marker=marker, markersize=3, label=label)
    if acc.get("zero_shot") is not None:
        ax.axhline(acc["zero_shot"], color="grey", linestyle="--", label="zero-shot")
    ax.set_xlabel("rounds completed" if plot_x == "rounds" else "sequential optimizer steps")
    ax.set_ylabel("held-out test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    legend_below(ax)
    if report.get("epsilon") and plot_x == "rounds":
        plot_epsilon(ax, [r["round"] + 1 for r in report["rounds"]], report["rounds"])
    ax.set_title(f"{report['dataset']['name']}, {report['config']['clients']} clients, {report['partition']['scheme']}")


def plot_bytes(bx, report: Dict) -> None:
    """Cumulative MB after round r at x = r + 1, the x at which the accuracy after that round is plotted."""
    plot_cumulative_mb(bx, [r["round"] + 1 for r in report["rounds"]], report["bytes"]["up_per_round"],
                       report["bytes"]["down_per_round"])


# -- the printed summary ------------------------------------------------------------------------
def _f(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


def summary(report: Dict) -> str:
    acc = report["accuracy"]
    rounds = len(acc["federated"]) - 1
    comp = report.get("comparison") or comparison(acc)
    w = comp["window"]
    per_round = report.get("steps", {}).get("per_round", {})
    lines = [f"held-out test accuracy after {rounds} rounds (final, and mean of the last {w} rounds):",
             f"  {'method':32s} {'final':>7s} {'last ' + str(w):>8s}  steps/round"]
    for m, label in LABELS.items():
        if m in acc:
            s = per_round.get(m)
            steps = (f"{min(s.values())}-{max(s.values())} (per client)" if isinstance(s, dict) and s
                     else "-" if s is None else str(s))
            lines.append(f"  {label:32s} {_f(comp['final'].get(m)):>7s} {_f(comp['last_mean'].get(m)):>8s}  {steps}")
    lines.append(f"  {'zero-shot':32s} {_f(acc['zero_shot']):>7s}")
    if "rounds_to_target" in comp:
        target = comp["target"]["accuracy"]
        reached = ", ".join(f"{m.replace('_', ' ')} {'never' if r is None else r}"
                            for m, r in comp["rounds_to_target"].items())
        lines.append(f"rounds to {TARGET_FRACTION:.0%} of centralised's last-{w} mean ({target:.4f}): {reached}")
    if "modes" in report:
        m = report["modes"]
        lines.append(f"time to the sync run's final accuracy ({_f(m['target_accuracy'])}), from the first round:")
        for name in ("sync", "async"):
            got = m[name]
            reach = "never" if got["time_to_target_s"] is None else f"{got['time_to_target_s']:.1f} s"
            lines.append(f"  {name:<5} {reach:>8}  ({got['globals']} globals in {got['seconds']:.1f} s, final "
                         f"{_f(got['final_accuracy'])}, rejected {got['rejection_counts'] or 'none'})")
    if report.get("epsilon"):
        lines.append(f"  epsilon spent    {report['epsilon'][-1]:.4g} at delta {report['config']['dp_delta']:g}")
    out = Path(report["out"])
    lines.append(f"report: {out / 'report.json'} and {out / 'report.png'}")
    return "\n".join(lines)


# -- several seeds ------------------------------------------------------------------------------
def mean_sd(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    """Mean and sample standard deviation (None with fewer than two known values)."""
    known = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not known:
        return {"mean": None, "sd": None, "n": 0}
    sd = float(np.std(known, ddof=1)) if len(known) > 1 else None
    return {"mean": float(np.mean(known)), "sd": sd, "n": len(known)}


def seeds_report(reports: Sequence[Dict], out: Path) -> Dict:
    """Mean +- sd over seed runs of each method's final and last-window accuracy, and the curves' means."""
    first = reports[0]
    methods = [m for m in (*LABELS, "zero_shot") if all(m in r["accuracy"] for r in reports)]
    stats: Dict = {}
    for m in methods:
        if m == "zero_shot":
            stats[m] = {"final": mean_sd([r["accuracy"][m] for r in reports])}
            continue
        stats[m] = {"final": mean_sd([r["comparison"]["final"][m] for r in reports]),
                    "last_mean": mean_sd([r["comparison"]["last_mean"][m] for r in reports])}
        if all("rounds_to_target" in r["comparison"] for r in reports):
            stats[m]["rounds_to_target"] = [r["comparison"]["rounds_to_target"].get(m) for r in reports]
    curves = {m: [mean_sd([r["accuracy"][m][i] for r in reports])["mean"] for i in range(len(first["accuracy"][m]))]
              for m in methods if m != "zero_shot"}
    return {
        "config": first["config"], "dataset": first["dataset"], "partition_scheme": first["partition"]["scheme"],
        "seeds": [{"model": r["seeds"]["model"], "data": r["seeds"]["data"], "out": r["out"]} for r in reports],
        "window": first["comparison"]["window"], "stats": stats, "mean_curves": curves,
        "steps": first.get("steps"), "out": str(out),
    }


def seeds_summary(agg: Dict) -> str:
    n = len(agg["seeds"])
    w = agg["window"]
    lines = [f"over {n} seeds (model and data seeds {[(s['model'], s['data']) for s in agg['seeds']]}), "
             f"mean +- sd:", f"  {'method':32s} {'final':>16s} {'last ' + str(w):>16s}"]
    for m, st in agg["stats"].items():
        label = LABELS.get(m, "zero-shot")

        def fmt(x: Optional[Dict]) -> str:
            if not x or x["mean"] is None:
                return "-"
            return f"{x['mean']:.4f}" + (f" +- {x['sd']:.4f}" if x["sd"] is not None else "")

        lines.append(f"  {label:32s} {fmt(st.get('final')):>16s} {fmt(st.get('last_mean')):>16s}")
    lines.append(f"report: {Path(agg['out']) / 'report.json'} (each seed's run in its own folder)")
    return "\n".join(lines)
