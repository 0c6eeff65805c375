"""The aggregator's durable state: the current global adapter, the open round, history, and spooled updates.

A completed round is committed in three steps, each atomic (write then rename): the new global goes
to its own file, then state.json switches to it (carrying the round's history row), then the row is
appended to history.jsonl. A crash between any two leaves a state that `load` repairs: state.json
is the truth, and a row it carries that history.jsonl lacks is appended.

Accepted updates of the open round are spooled to disk (written and fsynced) before the aggregator
acknowledges them to the broker, and the open round's record (asked clients, rejections, metrics,
extensions) is saved beside them when the round opens, after every rejection, metrics message and
extension, so a restarted aggregator resumes the same round with the same clients, rejection counts
and updates instead of waiting for clients that already submitted (they never submit a round twice).
Updates that arrive while no round is open are counted in `no-round.json` in the next round's spool
folder until that round opens and takes them into its record.

state.json also carries the run id: a random name given to the federation run when a state dir is
started afresh (kept on resume), announced in every `round` message.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from flora.edge.errors import EXIT_UNAVAILABLE, FloraError
from flora.edge.fileio import PathLike, append_line, atomic_write_bytes, atomic_write_json, sha256_bytes, strict_json

STATE = "state.json"
HISTORY = "history.jsonl"
SPOOL = "spool"
OPEN_ROUND = "round.json"
NO_ROUND = "no-round.json"
DEVICES = "devices.json"
LOCK = ".lock"
FORMAT = "flora-aggregator-state"


class CheckpointError(FloraError, RuntimeError):
    """The state dir is unreadable, corrupt, locked, or belongs to another federation."""

    exit_code = EXIT_UNAVAILABLE


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
    run_id: str = ""  # random per fresh start; "" in a state dir written before run ids existed


def new_run_id() -> str:
    """A random run id: 16 hex digits."""
    return secrets.token_hex(8)


class Checkpoint:
    """The files of one state dir: state.json, global-NNNNNN.safetensors, history.jsonl, spool/."""

    def __init__(self, directory: PathLike, create: bool = True) -> None:
        self.dir = Path(directory)
        if create:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd: Optional[int] = None

    @classmethod
    def reader(cls, directory: PathLike) -> Checkpoint:
        """Read-only access (status, dashboard): creates nothing, takes no lock."""
        return cls(directory, create=False)

    def lock(self) -> None:
        """Hold the state dir exclusively for this process (released when it exits), so that two
        aggregators can never write one state dir; CheckpointError if another process holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX: no locking
            return
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CheckpointError(f"state dir {self.dir} is in use by another flora-aggregator (pid {holder})"
                                  ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

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
        self._drop_stale_spools(state.round)
        self._sweep_leftovers(state)
        return state, blob

    def _sweep_leftovers(self, state: AggregatorState) -> None:
        """Files a kill inside a commit or a write leaves: globals that state.json names nowhere (the next one,
        written before state.json switched to it, or the previous one, not yet deleted; the globals an async
        window keeps are named in `extra['async']['window']`) and the temporary files of atomic writes
        (`.NAME.XXXX.tmp`) here and in the spool."""
        keep = {state.global_file, *_strings_in(state.extra.get("async", {}).get("window"))}
        for path in self.dir.glob("global-*.safetensors"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
        for path in (*self.dir.glob(".*.tmp"), *(self.dir / SPOOL).glob("round-*/.*.tmp")):
            path.unlink(missing_ok=True)

    def _reconcile_history(self, state: AggregatorState) -> None:
        row = state.last_row
        if row is None:
            return
        rows = self.history()
        if not rows or rows[-1].get("round") != row.get("round"):
            append_line(self.dir / HISTORY, strict_json(row))

    def start(self, model_id: str, rounds_total: int, initial_global: bytes,
              run_id: Optional[str] = None) -> AggregatorState:
        """A fresh state at round 0 with a new run id (or `run_id`)."""
        state = AggregatorState(model_id, 0, rounds_total, "", "", run_id=run_id or new_run_id())
        self._write_global(state, 0, initial_global)
        atomic_write_json(self.dir / STATE, asdict(state))
        return state

    def save(self, state: AggregatorState) -> None:
        atomic_write_json(self.dir / STATE, asdict(state))

    def commit(self, state: AggregatorState, next_round: int, global_blob: bytes, row: Dict[str, Any],
               done: bool) -> AggregatorState:
        """Record a completed round (the new global, the next open round, the history row); the new state."""
        previous = state.global_file
        new = replace(state, round=next_round, done=done, last_row=row, extra=dict(state.extra))
        self._write_global(new, next_round, global_blob)
        atomic_write_json(self.dir / STATE, asdict(new))
        append_line(self.dir / HISTORY, strict_json(row))
        if previous and previous != new.global_file:
            (self.dir / previous).unlink(missing_ok=True)
        self.clear_spool(row["round"])
        return new

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
        """Store an accepted update durably (written, fsynced, renamed) before it is acknowledged."""
        atomic_write_bytes(self.spool_dir(round_) / f"{client}.safetensors", blob)

    def unspool(self, round_: int, client: str) -> None:
        """Forget a spooled update (one that no longer validates when it is re-folded)."""
        (self.spool_dir(round_) / f"{client}.safetensors").unlink(missing_ok=True)

    def spooled(self, round_: int) -> Iterator[Tuple[str, bytes]]:
        """(client, blob) of each update accepted in `round_` before a restart, read one at a time."""
        folder = self.spool_dir(round_)
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.safetensors")):
            try:
                blob = path.read_bytes()
            except OSError:
                continue
            yield path.name[: -len(".safetensors")], blob

    def clear_spool(self, round_: int) -> None:
        shutil.rmtree(self.spool_dir(round_), ignore_errors=True)

    def _drop_stale_spools(self, open_round: int) -> None:
        """Spools of rounds before the open one (a crash between commit and cleanup leaves them)."""
        for folder in (self.dir / SPOOL).glob("round-*"):
            try:
                number = int(folder.name[len("round-"):])
            except ValueError:
                continue
            if number < open_round:
                shutil.rmtree(folder, ignore_errors=True)

    def save_open_round(self, round_: int, record: Dict[str, Any]) -> None:
        atomic_write_json(self.spool_dir(round_) / OPEN_ROUND, record)

    def load_open_round(self, round_: int) -> Optional[Dict[str, Any]]:
        """The saved record of open round `round_`, or None (not started, or unreadable: start it afresh)."""
        path = self.spool_dir(round_) / OPEN_ROUND
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("number") == round_ else None

    # -- devices (what the operator views show; not needed to resume) --------------------------------
    def save_devices(self, registry: Dict[str, Any]) -> None:
        atomic_write_json(self.dir / DEVICES, registry)

    def load_devices(self) -> Optional[Dict[str, Any]]:
        try:
            data = json.loads((self.dir / DEVICES).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    # -- updates that arrived while no round was open ------------------------------------------------
    def save_no_round(self, round_: int, record: Dict[str, Any]) -> None:
        """Those counted so far, to go into round `round_`'s record when it opens."""
        atomic_write_json(self.spool_dir(round_) / NO_ROUND, record)

    def load_no_round(self, round_: int) -> Optional[Dict[str, Any]]:
        try:
            record = json.loads((self.spool_dir(round_) / NO_ROUND).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("round") == round_ else None

    def clear_no_round(self, round_: int) -> None:
        (self.spool_dir(round_) / NO_ROUND).unlink(missing_ok=True)


def _strings_in(value: Any) -> List[str]:
    """Every string inside nested lists and dicts (file names a state keeps, wherever it keeps them)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings_in(v)]
    return []
