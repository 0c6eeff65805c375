"""The aggregator's durable state: the current global adapter, the open round, history, and spooled updates.

A completed round is committed in three steps, each atomic (write then rename): the new global goes
to its own file, then state.json switches to it (carrying the round's history row), then the row is
appended to history.jsonl. A crash between any two leaves a state that `load` repairs: state.json
is the truth, and a row it carries that history.jsonl lacks is appended.

Accepted updates of the open round are spooled to disk as they arrive, so a restarted aggregator
re-folds them instead of waiting for clients that already submitted.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from edge.fileio import PathLike, append_line, atomic_write_bytes, atomic_write_json, sha256_bytes

STATE = "state.json"
HISTORY = "history.jsonl"
SPOOL = "spool"
FORMAT = "flora-aggregator-state"


class CheckpointError(RuntimeError):
    pass


@dataclass
class AggregatorState:
    model_id: str
    round: int  # the round that is open (or, when done, the number of rounds run)
    rounds_total: int
    global_file: str
    global_sha256: str
    done: bool = False
    last_row: Optional[Dict[str, Any]] = None
    format: str = FORMAT
    version: int = 1
    extra: Dict[str, Any] = field(default_factory=dict)


class Checkpoint:
    def __init__(self, directory: PathLike) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    # -- state ---------------------------------------------------------------------------------
    def load(self) -> Optional[Tuple[AggregatorState, bytes]]:
        """(state, global blob) of the last commit, or None for a fresh state dir."""
        path = self.dir / STATE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            state = AggregatorState(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"aggregator state {path} is unreadable: {exc}") from exc
        if state.format != FORMAT:
            raise CheckpointError(f"{path} is not an aggregator state file")
        blob_path = self.dir / state.global_file
        try:
            blob = blob_path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"the checkpointed global {blob_path} is missing: {exc}") from exc
        if sha256_bytes(blob) != state.global_sha256:
            raise CheckpointError(f"the checkpointed global {blob_path} does not match its sha256 in {path}")
        self._reconcile_history(state)
        return state, blob

    def _reconcile_history(self, state: AggregatorState) -> None:
        row = state.last_row
        if row is None:
            return
        rows = self.history()
        if not rows or rows[-1].get("round") != row.get("round"):
            append_line(self.dir / HISTORY, json.dumps(row, sort_keys=True))

    def start(self, model_id: str, rounds_total: int, initial_global: bytes) -> AggregatorState:
        state = AggregatorState(model_id, 0, rounds_total, "", "")
        self._write_global(state, 0, initial_global)
        atomic_write_json(self.dir / STATE, asdict(state))
        return state

    def save(self, state: AggregatorState) -> None:
        atomic_write_json(self.dir / STATE, asdict(state))

    def commit(self, state: AggregatorState, next_round: int, global_blob: bytes, row: Dict[str, Any],
               done: bool) -> None:
        """Record a completed round: the new global, the next open round, the history row."""
        previous = state.global_file
        self._write_global(state, next_round, global_blob)
        state.round = next_round
        state.done = done
        state.last_row = row
        atomic_write_json(self.dir / STATE, asdict(state))
        append_line(self.dir / HISTORY, json.dumps(row, sort_keys=True))
        if previous and previous != state.global_file:
            (self.dir / previous).unlink(missing_ok=True)
        self.clear_spool(row["round"])

    def _write_global(self, state: AggregatorState, round_: int, blob: bytes) -> None:
        name = f"global-{round_:06d}.safetensors"
        atomic_write_bytes(self.dir / name, blob)
        state.global_file = name
        state.global_sha256 = sha256_bytes(blob)

    def history(self) -> List[Dict[str, Any]]:
        path = self.dir / HISTORY
        if not path.exists():
            return []
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # a torn last line from a crash mid-append; its row is in state.json
        return rows

    # -- spool of the open round -------------------------------------------------------------
    def spool_dir(self, round_: int) -> Path:
        return self.dir / SPOOL / f"round-{round_:06d}"

    def spool(self, round_: int, client: str, blob: bytes) -> None:
        atomic_write_bytes(self.spool_dir(round_) / f"{client}.safetensors", blob)

    def spooled(self, round_: int) -> List[Tuple[str, bytes]]:
        folder = self.spool_dir(round_)
        if not folder.is_dir():
            return []
        return [(p.stem, p.read_bytes()) for p in sorted(folder.glob("*.safetensors"))]

    def clear_spool(self, round_: int) -> None:
        shutil.rmtree(self.spool_dir(round_), ignore_errors=True)
