"""`flora-aggregator status` and `plot`: the history of a state dir as a table and a PNG.

Rounds are numbered as flora-sim numbers them: by rounds completed, 0 being the initial global (shown when it
was evaluated) and r + 1 the global that round r closed with. matplotlib is an optional extra
(`pip install 'flora-edge[plot]'`), imported only to plot.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .checkpoint import STATE, Checkpoint


def _fmt(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def epsilon_of(row: Dict[str, Any]) -> Optional[float]:
    """The epsilon a DP federation had spent after this round (None for a round without DP; inf, which JSON
    stores as null, once a round ran without noise)."""
    dp = row.get("dp")
    if not isinstance(dp, dict) or "epsilon" not in dp:
        return None
    value = dp["epsilon"]
    return float(value) if isinstance(value, (int, float)) else math.inf


def history_table(rows: List[Dict[str, Any]], initial: Optional[Dict[str, Any]] = None) -> str:
    """One line per global: rounds completed, clients, accuracy, bytes up and down, time (and epsilon under
    differential privacy); a first line for the initial global (round 0) when it was evaluated."""
    private = any(epsilon_of(r) is not None for r in rows)
    header = (f"{'round':>5} {'asked':>5} {'reported':>8} {'rejected':>8} {'samples':>8} {'client acc':>10} "
              f"{'test acc':>8} {'MB up':>8} {'MB down':>8} {'time s':>7}" + (f" {'epsilon':>8}" if private else ""))
    lines = [header, "-" * len(header)]
    if initial and isinstance(initial.get("test_accuracy"), (int, float)):
        lines.append(f"{0:>5} {'-':>5} {'-':>8} {'-':>8} {'-':>8} {'-':>10} {_fmt(initial['test_accuracy']):>8} "
                     f"{'-':>8} {'-':>8} {'-':>7}" + (f" {0.0:>8.3f}" if private else ""))
    for r in rows:
        lines.append(
            f"{r['round'] + 1:>5} {r['num_asked']:>5} {r['num_reported']:>8} "
            f"{r.get('num_rejected', len(r.get('rejected', []))):>8} {r.get('samples', 0):>8} "
            f"{_fmt(r.get('mean_client_accuracy')):>10} {_fmt(r.get('test_accuracy')):>8} "
            f"{r['bytes_received'] / 1e6:>8.3f} {r['bytes_sent'] / 1e6:>8.3f} {r['wall_time_s']:>7.1f}"
            + (f" {_fmt(epsilon_of(r), '.3f'):>8}" if private else "")
            + (f"  FAILED: {r['failed']}" if r.get("failed") else "")
        )
    return "\n".join(lines)


def privacy_summary(rows: List[Dict[str, Any]], state: Dict[str, Any]) -> Optional[str]:
    """What a DP federation has spent: epsilon at delta, against its budget, and against an observer who knows
    who took part; why it stopped, if it stopped at its budget. None without DP rounds."""
    last = next((r["dp"] for r in reversed(rows) if epsilon_of(r) is not None), None)
    stopped = state.get("extra", {}).get("stopped")
    if last is None and not stopped:
        return None
    lines = []
    if last is not None:
        budget = last.get("max_epsilon")
        lines.append(
            f"differential privacy ({last.get('mode', 'central')}, clip {_fmt(last.get('clip'), 'g')}, noise "
            f"multiplier {_fmt(last.get('noise_multiplier'), 'g')}, {last.get('accountant', 'pld')}): epsilon "
            f"{_fmt(last.get('epsilon'), '.4g')} at delta {_fmt(last.get('delta'), 'g')}"
            + (f" of a budget of {budget:g}" if isinstance(budget, (int, float)) else "")
            + f"; {_fmt(last.get('epsilon_sampling_known'), '.4g')} against someone who knows which rounds a device "
            f"took part in (at most {last.get('most_rounds_of_one_device', '-')} for one device)")
    if isinstance(stopped, dict):
        lines.append(f"stopped before round {stopped.get('round')}: {stopped.get('detail', stopped.get('reason'))}")
    return "\n".join(lines)


def _ago(ts: Any, now: float) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    s = max(0.0, now - ts)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def clients_table(devices: List[Dict[str, Any]], now: float) -> str:
    """One line per device: state, last seen, backend, samples, its last round's metrics, its last error."""
    header = (f"{'device':<24} {'state':<9} {'seen':>6} {'backend':<12} {'samples':>8} {'round':>5} {'loss':>8} "
              f"{'acc':>7} {'step ms':>8} {'RSS MiB':>8}  last error")
    lines = [header, "-" * len(header)]
    for d in devices:
        step = d.get("step_time_s")
        lines.append(
            f"{str(d.get('client_id'))[:24]:<24} {str(d.get('state'))[:9]:<9} {_ago(d.get('last_seen'), now):>6} "
            f"{str(d.get('backend') or '-')[:12]:<12} {_fmt(d.get('num_samples'), 'd'):>8} "
            f"{_fmt(d.get('metrics_round'), 'd'):>5} {_fmt(d.get('loss')):>8} {_fmt(d.get('accuracy'), '.3f'):>7} "
            f"{_fmt(1e3 * step if isinstance(step, (int, float)) else None, '.1f'):>8} "
            f"{_fmt(d.get('peak_rss_mb'), '.0f'):>8}  {d.get('last_error') or ''}"
        )
    return "\n".join(lines)


def model_files(state_dir: Path, state: Dict[str, Any]) -> List[str]:
    """Where the models are: the latest global, the best one (--keep-best), the earlier ones kept."""
    root = Path(state_dir)
    lines = [f"latest model: {root / state['global_file']}"] if state.get("global_file") else []
    best = state.get("extra", {}).get("best")
    if best and (root / best["file"]).is_file():
        label = best["metric"].replace("_", " ")
        lines.append(f"best model: {root / best['file']} (after {best['rounds_completed']} rounds: {label} "
                     f"{_fmt(best['value'])})")
    kept = sorted(p.name for p in root.glob("global-*.safetensors"))
    if len(kept) > 1:
        lines.append(f"{len(kept)} globals kept: {', '.join(kept) if len(kept) <= 6 else kept[0] + ' … ' + kept[-1]}")
    return lines


def _read_state(state_dir: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((Path(state_dir) / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def print_status(state_dir: Path, plot: Optional[Path] = None, out: Callable[[str], None] = print,
                 clients: bool = False, now: Optional[float] = None) -> int:
    state = _read_state(state_dir)
    if state is None:
        print(f"flora-aggregator: error: no readable aggregator state ({STATE}) in {state_dir}", file=sys.stderr)
        return 2
    cp = Checkpoint.reader(state_dir)
    rows = cp.history()
    if state["done"]:
        phase = "done"
    else:
        phase = f"round {state['round']} open"
        record = cp.load_open_round(state["round"], replay=True)
        if record is not None:
            spooled = len(record["reported"])
            phase += (f" (asked {len(record['asked'])}, {spooled} update(s) accepted so far, "
                      f"extended {record['extensions']} time(s))")
    run = f" (run {state['run_id']})" if state.get("run_id") else ""
    out(f"model {state['model_id'][:16]}…{run}: {phase}; {len(rows)} of {state['rounds_total']} rounds completed")
    initial = state.get("extra", {}).get("initial_eval")
    if rows or initial:
        out(history_table(rows, initial))
        summary = privacy_summary(rows, state)
        if summary:
            out(summary)
        reasons: Dict[str, int] = {}
        for r in rows:
            for reason, n in r.get("rejection_counts", {}).items():
                reasons[reason] = reasons.get(reason, 0) + n
        if reasons:
            out(f"rejected updates by reason: {dict(sorted(reasons.items()))}")
    for line in model_files(state_dir, state):
        out(line)
    if clients:
        import time

        devices = (cp.load_devices() or {}).get("devices", [])
        out(f"{len(devices)} device(s):" if devices else "no devices recorded yet")
        if devices:
            out(clients_table(devices, time.time() if now is None else now))
    if plot is not None:
        return write_plot(state_dir, plot)
    return 0


def write_plot(state_dir: Path, out_path: Path) -> int:
    """Accuracy per round (clients' mean local validation accuracy, and test accuracy where a row has it)
    and bytes up and down per round, as one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("flora-aggregator: error: plotting needs matplotlib: pip install 'flora-edge[plot]'", file=sys.stderr)
        return 2
    rows = Checkpoint.reader(state_dir).history() if (Path(state_dir) / STATE).exists() else []
    if not rows:
        print(f"flora-aggregator: error: no completed rounds in {state_dir}", file=sys.stderr)
        return 2
    state = _read_state(state_dir) or {}
    initial = state.get("extra", {}).get("initial_eval") or {}
    done = [r["round"] + 1 for r in rows]  # the global closed in round r is the model after r+1 rounds
    fig, (ax_acc, ax_bytes) = plt.subplots(1, 2, figsize=(10, 4.4))
    if any(isinstance(r.get("test_accuracy"), (int, float)) for r in rows):
        xs = ([0] if "test_accuracy" in initial else []) + done
        ys = ([initial["test_accuracy"]] if "test_accuracy" in initial else []) + [r.get("test_accuracy")
                                                                                  for r in rows]
        ax_acc.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label="global, test set")
    if any(isinstance(r.get("mean_client_accuracy"), (int, float)) for r in rows):
        ax_acc.plot(done, [float("nan") if r.get("mean_client_accuracy") is None else r["mean_client_accuracy"]
                           for r in rows], marker="s", label="clients, local validation (mean)")
    ax_acc.set_xlabel("rounds completed")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    plot_epsilon(ax_acc, done, rows)
    if ax_acc.get_legend_handles_labels()[0]:
        legend_below(ax_acc)
    else:
        ax_acc.text(0.5, 0.5, "no accuracy reported", ha="center", va="center", transform=ax_acc.transAxes)
    ax_acc.grid(alpha=0.3)
    plot_cumulative_mb(ax_bytes, done, [r["bytes_received"] for r in rows], [r["bytes_sent"] for r in rows],
                       up_label="up (updates accepted)", down_label="down (global x asked)")
    fig.tight_layout()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    print(f"wrote {out_path}")
    return 0


def plot_epsilon(ax, rounds_completed: List[int], rows: List[Dict[str, Any]]) -> None:
    """Under differential privacy: epsilon spent against rounds completed, on a second y axis of `ax`."""
    eps = [epsilon_of(r) for r in rows]
    if not any(e is not None for e in eps):
        return
    twin = ax.twinx()
    twin.plot([0, *rounds_completed], [0.0, *[float("nan") if e is None else e for e in eps]], color="tab:red",
              linestyle="--", marker=".", label="epsilon spent")
    twin.set_ylabel("epsilon (DP)", color="tab:red")
    twin.tick_params(axis="y", labelcolor="tab:red")
    twin.set_ylim(bottom=0)


def plot_cumulative_mb(ax, rounds_completed: List[int], up: List[int], down: List[int], up_label: str = "up",
                       down_label: str = "down") -> None:
    """Cumulative MB up and down against rounds completed (per-round bars of equal rounds say nothing)."""
    import numpy as np

    ax.plot(rounds_completed, np.cumsum(up) / 1e6, marker="o", label=up_label)
    ax.plot(rounds_completed, np.cumsum(down) / 1e6, marker="s", label=down_label)
    ax.set_xlabel("rounds completed")
    ax.set_ylabel("cumulative MB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    legend_below(ax)


def legend_below(ax, ncol: int = 2) -> None:
    """The legend under the axes, where it cannot cover data."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, frameon=False, fontsize="small")
