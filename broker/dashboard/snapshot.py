"""The dashboard's one view model: a JSON-ready dict built from the aggregator's state, history, open round and
devices. Pure (the caller passes `now`); `from_state_dir` reads the same inputs from a state dir's files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..checkpoint import STATE, Checkpoint

#: Fields of a history row the round chart and table use (the row has more).
ROUND_FIELDS = ("round", "test_accuracy", "test_loss", "mean_client_accuracy", "mean_client_loss", "num_asked",
                "num_reported", "num_rejected", "samples", "bytes_received", "bytes_sent", "wall_time_s",
                "aggregation_s", "closed_at", "failed", "epsilon")


@dataclass(frozen=True)
class FederationInfo:
    """What the snapshot says of the federation's configuration (live: from the aggregator's config)."""

    federation: str = "default"
    mode: str = "sync"
    strategy: str = "fedavg"
    min_clients: Optional[int] = None
    round_timeout_s: Optional[float] = None
    live: bool = True

    def to_json(self) -> Dict[str, Any]:
        return {"federation": self.federation, "mode": self.mode, "strategy": self.strategy,
                "min_clients": self.min_clients, "round_timeout_s": self.round_timeout_s}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], live: bool) -> FederationInfo:
        """What an aggregator saved in its state (`extra.federation`); missing fields keep their defaults."""
        known = ("federation", "mode", "strategy", "min_clients", "round_timeout_s")
        return cls(live=live, **{k: d[k] for k in known if k in d})


def round_points(rows: Sequence[Mapping[str, Any]], initial: Optional[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One point per global adapter, numbered by rounds completed: 0 is the initial global (when it was
    evaluated), the global closed in round r is point r + 1 (the numbering of `status` and flora-sim)."""
    points: List[Dict[str, Any]] = []
    if initial and isinstance(initial.get("test_accuracy"), (int, float)):
        points.append({"rounds_completed": 0, "test_accuracy": initial.get("test_accuracy"),
                       "test_loss": initial.get("test_loss")})
    for row in rows:
        point = {k: row.get(k) for k in ROUND_FIELDS if k in row}
        point["rounds_completed"] = int(row["round"]) + 1
        points.append(point)
    return points


def build_snapshot(state: Optional[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                   open_round: Optional[Mapping[str, Any]], devices: Sequence[Mapping[str, Any]],
                   info: FederationInfo, now: float) -> Dict[str, Any]:
    """The whole view: the federation, the open round, one point per round, totals and the device table."""
    state = state or {}
    rejections: Dict[str, int] = {}
    for row in rows:
        for reason, n in (row.get("rejection_counts") or {}).items():
            rejections[reason] = rejections.get(reason, 0) + int(n)
    current = None
    if open_round is not None:
        counts = dict(open_round.get("rejection_counts") or {})
        current = {
            "number": open_round.get("number"), "asked": len(open_round.get("asked") or ()),
            "reported": len(open_round.get("reported") or {}), "rejected": sum(counts.values()),
            "rejection_counts": counts, "deadline": open_round.get("deadline"),
            "started_at": open_round.get("started_at"), "extensions": open_round.get("extensions", 0),
            "quorum": info.min_clients,
        }
    epsilons = [row["epsilon"] for row in rows if isinstance(row.get("epsilon"), (int, float))]
    extra = state.get("extra") or {}
    phase = "done" if state.get("done") else ("open" if current is not None else "waiting")
    return {
        "federation": info.federation, "mode": info.mode, "strategy": info.strategy, "live": info.live,
        "model_id": state.get("model_id"), "run_id": state.get("run_id"), "phase": phase,
        "round": state.get("round"), "rounds_total": state.get("rounds_total"),
        "rounds_completed": len(rows), "round_timeout_s": info.round_timeout_s,
        "current": current, "points": round_points(rows, extra.get("initial_eval")),
        "totals": {
            "bytes_up": sum(int(r.get("bytes_received") or 0) for r in rows),
            "bytes_down": sum(int(r.get("bytes_sent") or 0) for r in rows),
            "updates_accepted": sum(int(r.get("num_reported") or 0) for r in rows),
            "updates_rejected": sum(rejections.values()),
            "rounds_failed": sum(1 for r in rows if r.get("failed")),
        },
        "rejections": dict(sorted(rejections.items())),
        "epsilon": epsilons[-1] if epsilons else None,
        "devices": list(devices),
        "generated_at": now,
    }


def read_json(path: Path) -> Optional[Any]:
    """A JSON file's content, or None when it is missing or unreadable (a state dir being written)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def from_state_dir(state_dir: Path, now: float, info: Optional[FederationInfo] = None) -> Dict[str, Any]:
    """The snapshot of a state dir as its files say (read-only: nothing is written or locked)."""
    cp = Checkpoint.reader(state_dir)
    state = read_json(Path(state_dir) / STATE)
    open_round = None
    if isinstance(state, dict) and not state.get("done") and isinstance(state.get("round"), int):
        open_round = cp.load_open_round(state["round"])
    devices = cp.load_devices() or {}
    rows = devices.get("devices", [])
    rows = rows if isinstance(rows, list) else []
    if info is None:
        saved = (state.get("extra") or {}).get("federation") if isinstance(state, dict) else None
        info = FederationInfo.from_json(saved if isinstance(saved, dict) else {}, live=False)
    return build_snapshot(state if isinstance(state, dict) else None, cp.history(), open_round, rows, info, now)
