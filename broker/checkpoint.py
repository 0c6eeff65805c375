"""The aggregator's durable state: the current global adapter, the open round, history, and spooled updates.

A completed round is committed in three steps, each atomic (write then rename): the new global goes
to its own file, then state.json switches to it (carrying the round's history row), then the row is
appended to history.jsonl. A crash between any two leaves a state that `load` repairs: state.json
is the truth, and a row it carries that history.jsonl lacks is appended.

The open round lives in its spool folder as a snapshot of its record (round.json: asked clients,
rejections, metrics, extensions) and an append-only journal (broker/journal.py) of what happened since
it opened: every accepted update's blob, every rejection, every metrics message, in arrival order. The
aggregator appends to the journal as it handles a batch of messages and makes the batch durable with one
sync before it acknowledges any of them, so an acknowledged update or rejection is never lost and a
rejection costs one appended record, not a rewrite of the round. The snapshot is rewritten when the
round opens or is extended and every few seconds, and says how much of the journal it includes
(`journal_offset`); a restarted aggregator re-folds every journaled update in arrival order (the same
sums, bit for bit), applies the rejections and metrics after that offset to the snapshot, and resumes
the same round with the same clients, rejection counts and updates instead of waiting for clients that
already submitted (they never submit a round twice).
Updates that arrive while no round is open are counted in `no-round.json` in the next round's spool
folder until that round opens and takes them into its record.

state.json also carries the run id: a random name given to the federation run when a state dir is
started afresh (kept on resume), announced in every `round` message.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from flora.edge.errors import EXIT_UNAVAILABLE, ConfigError, FloraError
from flora.edge.fileio import (
    PathLike,
    append_line,
    atomic_write_bytes,
    atomic_write_json,
    json_safe,
    sha256_bytes,
    strict_json,
)

from .journal import Journal, Record, scan

STATE = "state.json"
HISTORY = "history.jsonl"
SPOOL = "spool"
OPEN_ROUND = "round.json"
JOURNAL = "journal.log"
# journal record kinds
UPDATE, REJECTION, METRICS, DROP = 1, 2, 3, 4
NO_ROUND = "no-round.json"
DEVICES = "devices.json"
SECAGG = "secagg.json"  # the open round's secure-aggregation attempts (broker/secure_round.py)
SECURE_SUM = "secure-sum.npy"  # its unmasked sum, once an attempt completed: an aggregate, never one update
LOCK = ".lock"
FORMAT = "flora-aggregator-state"


def global_file_name(round_: int) -> str:
    return f"global-{round_:06d}.safetensors"


def _global_number(name: str) -> Optional[int]:
    try:
        return int(name[len("global-"):-len(".safetensors")])
    except ValueError:
        return None


def apply_record(rec: Any, entry: Record) -> None:
    """A journaled rejection or metrics message, applied to a `RoundRecord` (as a restart rebuilds it)."""
    try:
        data = json.loads(entry.payload)
    except ValueError:  # written by the aggregator itself: only disk corruption the CRC missed
        return
    if entry.kind == REJECTION:
        rec.reject(entry.key, data["reason"], data["detail"], int(data["size"]))
    elif entry.kind == METRICS and entry.key in rec.reported:
        rec.metrics[entry.key] = data


class CheckpointError(FloraError, RuntimeError):
    """The state dir is unreadable, corrupt, locked, or belongs to another federation."""

    exit_code = EXIT_UNAVAILABLE


#: --keep-best metrics; `auto` is test_accuracy when held-out evaluation is configured, else mean_client_accuracy
KEEP_BEST_METRICS = ("auto", "test_accuracy", "mean_client_accuracy")


@dataclass(frozen=True)
class KeepPolicy:
    """Which global adapters a state dir keeps besides the current one.

    `globals`: the N latest (1: only the current one; None: all). `best`: also the best global by
    this history-row metric (higher is better; ties keep the earlier), recorded in state.json.
    """

    globals: Optional[int] = 1
    best: Optional[str] = None

    def __post_init__(self) -> None:
        if self.globals is not None and self.globals < 1:
            raise ConfigError(f"--keep-globals must be >= 1 or 'all', got {self.globals}")
        if self.best is not None and self.best not in KEEP_BEST_METRICS[1:]:
            raise ConfigError(f"--keep-best metric {self.best!r} is not one of {list(KEEP_BEST_METRICS)}")


def parse_keep_globals(text: Any) -> Optional[int]:
    """`N` (>= 1) or `all` (None); ConfigError otherwise."""
    if str(text).strip().lower() == "all":
        return None
    try:
        number = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"--keep-globals takes a number or 'all', not {text!r}") from None
    if number < 1:
        raise ConfigError(f"--keep-globals must be >= 1 or 'all', got {number}")
    return number


def keep_globals_arg(text: str) -> Optional[int]:
    """--keep-globals as an argparse type."""
    try:
        return parse_keep_globals(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def resolve_best_metric(metric: Optional[str], evaluation_configured: bool) -> Optional[str]:
    """`auto` -> test_accuracy with held-out evaluation, else mean_client_accuracy."""
    if metric == "auto":
        return "test_accuracy" if evaluation_configured else "mean_client_accuracy"
    return metric


def better(candidate: Optional[float], best: Optional[Dict[str, Any]]) -> bool:
    """Whether a metric value beats the recorded best (None never does; ties keep the earlier)."""
    if not isinstance(candidate, (int, float)) or candidate != candidate:  # None or NaN
        return False
    return best is None or candidate > best["value"]


def globals_to_keep(files: List[str], current: str, policy: KeepPolicy, best_file: Optional[str]) -> List[str]:
    """The global files of `files` (global-NNNNNN.safetensors) that `policy` keeps."""
    ordered = sorted(f for f in files if f.startswith("global-"))
    keep = set(ordered if policy.globals is None else ordered[-policy.globals:])
    keep.add(current)
    if best_file:
        keep.add(best_file)
    return sorted(f for f in ordered if f in keep)


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
    strategy: str = ""  # the aggregation strategy the run uses ("" in state dirs from before strategies had state)
    strategy_file: str = ""  # its state across rounds (a server optimizer's moments), beside the global
    strategy_sha256: str = ""


def new_run_id() -> str:
    """A random run id: 16 hex digits."""
    return secrets.token_hex(8)


class Checkpoint:
    """The files of one state dir: state.json, global-NNNNNN.safetensors, history.jsonl, spool/.

    `keep` says which globals survive a commit besides the current one (default: none).
    """

    def __init__(self, directory: PathLike, keep: Optional[KeepPolicy] = None, create: bool = True) -> None:
        self.dir = Path(directory)
        if create:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep or KeepPolicy()
        self._lock_fd: Optional[int] = None
        self._journal: Optional[Journal] = None
        self._journal_round: Optional[int] = None

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
        """Files a kill inside a commit or a write leaves: globals nothing keeps (the next one, written before
        state.json switched to it, or the previous one, not yet deleted; `prune_globals` keeps the current, the
        best, the keep policy's and the async window's) and the temporary files of atomic writes
        (`.NAME.XXXX.tmp`) here and in the spool."""
        self.prune_globals(state)
        for path in self.dir.glob("strategy-*.safetensors"):
            if path.name != state.strategy_file:
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
        self._write_state(state)
        return state

    def _write_state(self, state: AggregatorState) -> None:
        """state.json, atomically: shallow (its last_row of a 10,000-client round is not deep-copied) and compact
        JSON when it is large (the C encoder; indented JSON is written by the pure-Python one)."""
        data = json_safe({f.name: getattr(state, f.name) for f in fields(state)})
        big = len((state.last_row or {}).get("asked", ())) > 100
        text = json.dumps(data, sort_keys=True, allow_nan=False, **({"separators": (",", ":")} if big else
                                                                    {"indent": 2}))
        atomic_write_bytes(self.dir / STATE, (text + "\n").encode())

    def save(self, state: AggregatorState) -> None:
        self._write_state(state)

    def commit(self, state: AggregatorState, next_round: int, global_blob: bytes, row: Dict[str, Any],
               done: bool, keep_globals: int = 1,
               strategy_state: Optional[Mapping[str, np.ndarray]] = None) -> AggregatorState:
        """Record a completed round (the new global and the strategy's state, the next open round, the history
        row); the new state. The strategy state, like the global, is written before state.json points at it.

        The keep policy says which earlier globals stay (the N latest, the best); `keep_globals` > 1 (async
        rounds) also keeps that many of the latest globals on disk: the bases an update may still have."""
        previous_strategy = state.strategy_file
        new = replace(state, round=next_round, done=done, last_row=row, extra=dict(state.extra))
        self._write_global(new, next_round, global_blob)
        if strategy_state:
            self._write_strategy(new, next_round, strategy_state)
        self._note_best(new, row.get(self.keep.best) if self.keep.best else None, row["round"])
        self._write_state(new)
        append_line(self.dir / HISTORY, strict_json(row))
        self.prune_globals(new, window=keep_globals)
        if previous_strategy and previous_strategy != new.strategy_file:
            (self.dir / previous_strategy).unlink(missing_ok=True)
        self.clear_spool(row["round"])
        return new

    def load_global(self, round_: int) -> Optional[bytes]:
        """The global of an earlier round if it is still kept (async rounds keep a window of them), else None."""
        try:
            return (self.dir / global_file_name(round_)).read_bytes()
        except OSError:
            return None

    def _note_best(self, state: AggregatorState, value: Any, round_: Optional[int]) -> None:
        """Record the global just written as the best when its metric beats the recorded best."""
        best = state.extra.get("best")
        if self.keep.best and better(value, best):
            state.extra["best"] = {"file": state.global_file, "round": round_,
                                   "rounds_completed": 0 if round_ is None else round_ + 1,
                                   "metric": self.keep.best, "value": float(value)}

    def note_initial(self, state: AggregatorState, metrics: Dict[str, Any]) -> None:
        """The initial global's evaluation (round 0) competes for best too; saved with the state."""
        self._note_best(state, metrics.get(self.keep.best) if self.keep.best else None, None)
        self.save(state)

    def prune_globals(self, state: AggregatorState, window: int = 1) -> List[str]:
        """Delete the global files nothing keeps; the kept. Kept: the current, the best, the keep policy's N
        latest, the async window named in `extra['async']['window']`, and the `window` latest by number.
        Globals numbered after the current one (written by a commit that a kill cut short) are never kept."""
        current = _global_number(state.global_file)
        files = [p.name for p in self.dir.glob("global-*.safetensors")]
        earlier = [f for f in files if current is None or (_global_number(f) or 0) <= current]
        best = (state.extra.get("best") or {}).get("file")
        kept = set(globals_to_keep(earlier, state.global_file, self.keep, best))
        kept.update(f for f in _strings_in(state.extra.get("async", {}).get("window")) if f in earlier)
        if current is not None and window > 1:
            kept.update(f for f in earlier if (_global_number(f) or 0) > current - window)
        for name in sorted(set(files) - kept):
            (self.dir / name).unlink(missing_ok=True)
        return sorted(kept)

    def _write_strategy(self, state: AggregatorState, round_: int, tensors: Mapping[str, np.ndarray]) -> None:
        from safetensors.numpy import save

        name = f"strategy-{round_:06d}.safetensors"
        blob = save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
        atomic_write_bytes(self.dir / name, blob)
        state.strategy_file = name
        state.strategy_sha256 = sha256_bytes(blob)

    def strategy_state(self, state: AggregatorState) -> Dict[str, np.ndarray]:
        """The strategy state committed with `state` ({} if none); CheckpointError if it is missing or altered."""
        if not state.strategy_file:
            return {}
        path = self.dir / state.strategy_file
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"the checkpointed strategy state {path} is missing: {exc}") from exc
        if sha256_bytes(blob) != state.strategy_sha256:
            raise CheckpointError(f"the checkpointed strategy state {path} does not match its sha256")
        from safetensors.numpy import load

        return dict(load(blob))

    def _write_global(self, state: AggregatorState, round_: int, blob: bytes) -> None:
        name = global_file_name(round_)
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

    def journal(self, round_: int) -> Journal:
        """The open round's journal (opened on first use, a torn tail cut off; one open journal at a time)."""
        if self._journal is None or self._journal_round != round_:
            self.close_journal()
            self._journal, self._journal_round = Journal(self.spool_dir(round_) / JOURNAL).open(), round_
        return self._journal

    def close_journal(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal, self._journal_round = None, None

    def sync(self) -> None:
        """Make everything journaled so far durable (one flush; call it before acknowledging)."""
        if self._journal is not None:
            self._journal.sync()

    def journal_end(self, round_: int) -> int:
        """Bytes journaled so far in `round_` (what a snapshot taken now includes)."""
        return self.journal(round_).end

    def spool(self, round_: int, client: str, blob: bytes) -> None:
        """Journal an accepted update (durable at the next `sync`, which comes before its acknowledgement)."""
        self.journal(round_).append(UPDATE, client, blob)

    def record(self, round_: int, kind: int, client: str, data: Dict[str, Any]) -> None:
        """Journal a rejection or a metrics message of the open round (JSON)."""
        self.journal(round_).append(kind, client, strict_json(data).encode())

    def unspool(self, round_: int, client: str) -> None:
        """Forget a journaled update (one that no longer validates when it is re-folded)."""
        self.journal(round_).append(DROP, client, b"")

    def journaled(self, round_: int) -> Iterator[Record]:
        """Every record of `round_`'s journal in arrival order, updates that were dropped later left out."""
        path = self.spool_dir(round_) / JOURNAL
        if self._journal is not None and self._journal_round == round_:
            self._journal.sync()
        dropped = {r.key for r in scan(path) if r.kind == DROP}
        for rec in scan(path):
            if not (rec.kind in (UPDATE, DROP) and rec.key in dropped):
                yield rec

    def spooled(self, round_: int) -> Iterator[Tuple[str, bytes]]:
        """(client, blob) of each update accepted in `round_` (and not dropped), in arrival order."""
        for rec in self.journaled(round_):
            if rec.kind == UPDATE:
                yield rec.key, rec.payload

    def clear_spool(self, round_: int) -> None:
        if self._journal_round == round_:
            self.close_journal()
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
        """The snapshot of the open round's record (`journal_offset`: the journal bytes it includes); compact
        JSON, which the C encoder writes (a record of 10,000 clients is megabytes)."""
        text = json.dumps(json_safe(record), sort_keys=True, separators=(",", ":"), allow_nan=False)
        atomic_write_bytes(self.spool_dir(round_) / OPEN_ROUND, text.encode())

    def load_open_round(self, round_: int, replay: bool = False) -> Optional[Dict[str, Any]]:
        """The saved snapshot of open round `round_`, or None (not started, or unreadable: start it afresh).

        With `replay`, as a restarted aggregator would rebuild it: the journal's updates (`reported`, their
        num_samples) and the rejections and metrics journaled after the snapshot applied (reads the journal)."""
        path = self.spool_dir(round_) / OPEN_ROUND
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not (isinstance(record, dict) and record.get("number") == round_):
            return None
        return self._replayed(round_, record) if replay else record

    def _replayed(self, round_: int, record: Dict[str, Any]) -> Dict[str, Any]:
        from flora.edge import adapter

        from .rounds import RoundRecord

        offset = int(record.pop("journal_offset", 0) or 0)
        if record.get("mode") == "async":  # a FedBuff buffer: its updates by client@base
            record["reported"] = {e.key: 0 for e in self.journaled(round_) if e.kind == UPDATE}
            return record
        rec = RoundRecord.from_json(record)
        rec.reported = {}
        for entry in self.journaled(round_):
            if entry.kind == UPDATE:
                try:
                    rec.reported[entry.key] = int(adapter.read_header(entry.payload)[1].get("num_samples", 0))
                except (adapter.AdapterError, ValueError):
                    rec.reported[entry.key] = 0
            elif entry.offset >= offset:
                apply_record(rec, entry)
        return rec.to_json()

    # -- secure aggregation of the open round --------------------------------------------------------
    def save_secure(self, round_: int, record: Dict[str, Any]) -> None:
        atomic_write_json(self.spool_dir(round_) / SECAGG, record)

    def load_secure(self, round_: int) -> Optional[Dict[str, Any]]:
        """The saved attempts of open round `round_`, or None (a plain round, or none saved yet)."""
        try:
            record = json.loads((self.spool_dir(round_) / SECAGG).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("round") == round_ else None

    def save_secure_sum(self, round_: int, blob: bytes) -> None:
        """The unmasked sum of a completed attempt (.npy bytes), before the round is committed."""
        atomic_write_bytes(self.spool_dir(round_) / SECURE_SUM, blob)

    def load_secure_sum(self, round_: int) -> Optional[bytes]:
        try:
            return (self.spool_dir(round_) / SECURE_SUM).read_bytes()
        except OSError:
            return None

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
