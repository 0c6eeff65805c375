"""`flora-aggregator status` and `plot`: the history of a state dir as a table and a PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .checkpoint import STATE, Checkpoint


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def history_table(rows: List[Dict]) -> str:
    header = (f"{'round':>5} {'asked':>5} {'reported':>8} {'rejected':>8} {'test acc':>8} {'client acc':>10} "
              f"{'MB up':>8} {'MB down':>8} {'time s':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['round']:>5} {r['num_asked']:>5} {r['num_reported']:>8} {len(r['rejected']):>8} "
            f"{_fmt(r.get('test_accuracy')):>8} {_fmt(r.get('mean_client_accuracy')):>10} "
            f"{r['bytes_received'] / 1e6:>8.3f} {r['bytes_sent'] / 1e6:>8.3f} {r['wall_time_s']:>7.1f}"
        )
    return "\n".join(lines)


def print_status(state_dir: Path, plot: Optional[Path] = None, out=print) -> int:
    path = Path(state_dir) / STATE
    if not path.exists():
        print(f"flora-aggregator: error: no aggregator state in {state_dir}", file=sys.stderr)
        return 2
    state = json.loads(path.read_text())
    rows = Checkpoint(state_dir).history()
    phase = "done" if state["done"] else f"round {state['round']} open"
    out(f"model {state['model_id'][:16]}: {phase}, {len(rows)} of {state['rounds_total']} rounds completed")
    initial = state.get("extra", {}).get("initial_eval")
    if initial:
        out(f"initial global (round 0, zero-shot): test accuracy {initial['test_accuracy']:.4f}")
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("flora-aggregator: error: plotting needs matplotlib: pip install 'flora-edge[plot]'", file=sys.stderr)
        return 2
    rows = Checkpoint(state_dir).history()
    if not rows:
        print(f"flora-aggregator: error: no completed rounds in {state_dir}", file=sys.stderr)
        return 2
    rounds = [r["round"] + 1 for r in rows]  # the global produced by round r is the model after r+1 rounds
    fig, (ax_acc, ax_bytes) = plt.subplots(1, 2, figsize=(10, 4))
    state = json.loads((Path(state_dir) / STATE).read_text())
    initial = state.get("extra", {}).get("initial_eval")
    if any(r.get("test_accuracy") is not None for r in rows):
        xs = ([0] if initial else []) + rounds
        ys = ([initial["test_accuracy"]] if initial else []) + [r.get("test_accuracy") for r in rows]
        ax_acc.plot(xs, ys, marker="o", label="global, held-out test")
    if any(r.get("mean_client_accuracy") is not None for r in rows):
        ax_acc.plot(rounds, [r.get("mean_client_accuracy") for r in rows], marker="s",
                    label="clients, local validation (mean)")
    ax_acc.set_xlabel("rounds completed")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    numbers = [r["round"] for r in rows]
    ax_bytes.bar([x - 0.2 for x in numbers], [r["bytes_received"] / 1e6 for r in rows], width=0.4, label="up")
    ax_bytes.bar([x + 0.2 for x in numbers], [r["bytes_sent"] / 1e6 for r in rows], width=0.4, label="down")
    ax_bytes.set_xlabel("round")
    ax_bytes.set_ylabel("MB")
    ax_bytes.legend()
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    print(f"wrote {out_path}")
    return 0
