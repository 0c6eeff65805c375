"""`flora-aggregator status` and `plot`: the history of a state dir as a table and a PNG.

matplotlib is an optional extra (`pip install 'flora-edge[plot]'`), imported only to plot.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .checkpoint import STATE, Checkpoint


def _fmt(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def history_table(rows: List[Dict[str, Any]]) -> str:
    """One line per completed round: clients, accuracy, bytes up and down, time."""
    header = (f"{'round':>5} {'asked':>5} {'reported':>8} {'rejected':>8} {'samples':>8} {'client acc':>10} "
              f"{'test acc':>8} {'MB up':>8} {'MB down':>8} {'time s':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['round']:>5} {r['num_asked']:>5} {r['num_reported']:>8} "
            f"{r.get('num_rejected', len(r.get('rejected', []))):>8} {r.get('samples', 0):>8} "
            f"{_fmt(r.get('mean_client_accuracy')):>10} {_fmt(r.get('test_accuracy')):>8} "
            f"{r['bytes_received'] / 1e6:>8.3f} {r['bytes_sent'] / 1e6:>8.3f} {r['wall_time_s']:>7.1f}"
        )
    return "\n".join(lines)


def _read_state(state_dir: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((Path(state_dir) / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def print_status(state_dir: Path, plot: Optional[Path] = None, out: Callable[[str], None] = print) -> int:
    state = _read_state(state_dir)
    if state is None:
        print(f"flora-aggregator: error: no readable aggregator state ({STATE}) in {state_dir}", file=sys.stderr)
        return 2
    cp = Checkpoint(state_dir)
    rows = cp.history()
    if state["done"]:
        phase = "done"
    else:
        phase = f"round {state['round']} open"
        record = cp.load_open_round(state["round"])
        if record is not None:
            spooled = len(list(cp.spool_dir(state["round"]).glob("*.safetensors")))
            phase += (f" (asked {len(record['asked'])}, {spooled} update(s) accepted so far, "
                      f"extended {record['extensions']} time(s))")
    run = f" (run {state['run_id']})" if state.get("run_id") else ""
    out(f"model {state['model_id'][:16]}…{run}: {phase}; {len(rows)} of {state['rounds_total']} rounds completed")
    initial = state.get("extra", {}).get("initial_eval")
    if initial and "test_accuracy" in initial:
        out(f"initial global (round 0): test accuracy {_fmt(initial['test_accuracy'])}")
    if rows:
        out(history_table(rows))
        reasons: Dict[str, int] = {}
        for r in rows:
            for reason, n in r.get("rejection_counts", {}).items():
                reasons[reason] = reasons.get(reason, 0) + n
        if reasons:
            out(f"rejected updates by reason: {dict(sorted(reasons.items()))}")
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
    rows = Checkpoint(state_dir).history() if (Path(state_dir) / STATE).exists() else []
    if not rows:
        print(f"flora-aggregator: error: no completed rounds in {state_dir}", file=sys.stderr)
        return 2
    state = _read_state(state_dir) or {}
    initial = state.get("extra", {}).get("initial_eval") or {}
    done = [r["round"] + 1 for r in rows]  # the global closed in round r is the model after r+1 rounds
    fig, (ax_acc, ax_bytes) = plt.subplots(1, 2, figsize=(10, 4))
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
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend()
    else:
        ax_acc.text(0.5, 0.5, "no accuracy reported", ha="center", va="center", transform=ax_acc.transAxes)
    ax_acc.grid(alpha=0.3)
    numbers = [r["round"] for r in rows]
    ax_bytes.bar([x - 0.2 for x in numbers], [r["bytes_received"] / 1e6 for r in rows], width=0.4,
                 label="up (updates accepted)")
    ax_bytes.bar([x + 0.2 for x in numbers], [r["bytes_sent"] / 1e6 for r in rows], width=0.4,
                 label="down (global x asked)")
    ax_bytes.set_xlabel("round")
    ax_bytes.set_ylabel("MB")
    ax_bytes.legend()
    fig.tight_layout()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    print(f"wrote {out_path}")
    return 0
