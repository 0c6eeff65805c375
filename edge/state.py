"""What an agent persists across crashes: the rounds it submitted and the last global it applied.

Everything is written with write-then-rename, so a crash leaves either the old or the new file.
A round's update is stored (the outbox) before it is published and marked sent once the broker
acknowledged it: after a crash in between, the same bytes are sent again by the restarted agent
(the aggregator drops a duplicate), and a round is never trained or submitted a second time.

The record of submitted rounds holds for one federation run: one federation name and the
aggregator's `run_id`. Another federation, or another run_id, starts a fresh record.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .errors import FloraError
from .fileio import PathLike, atomic_write_bytes, atomic_write_json

STATE_FILE = "agent-state.json"
GLOBAL_FILE = "global.safetensors"
OUTBOX_FILE = "outbox.safetensors"


class StateError(FloraError, RuntimeError):
    """The state directory is unreadable or corrupt."""


@dataclass
class AgentState:
    client_id: Optional[str] = None
    model_id: Optional[str] = None
    federation: Optional[str] = None  # the federation the record of submitted rounds is for
    run_id: str = ""  # the aggregator's run the record is for ("" before the first run_id seen)
    last_submitted_round: Optional[int] = None  # trained and stored in the outbox (or given to secure aggregation)
    outbox_round: Optional[int] = None  # round of the update in the outbox
    outbox_sent: bool = True  # the broker acknowledged the outbox update
    global_round: Optional[int] = None  # round of the last global adapter applied
    global_sha256: Optional[str] = None

    def submitted(self, round_: int) -> bool:
        return self.last_submitted_round is not None and round_ <= self.last_submitted_round

    @property
    def outbox_pending(self) -> bool:
        """An update is stored that the broker has not acknowledged."""
        return self.outbox_round is not None and not self.outbox_sent

    def forget_submissions(self) -> None:
        """Start a fresh record of submitted rounds (another federation or run); drops the outbox."""
        self.last_submitted_round = None
        self.outbox_round = None
        self.outbox_sent = True


class StateStore:
    def __init__(self, directory: PathLike) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    def load(self) -> AgentState:
        if not self.state_path.exists():
            return AgentState()
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
            return AgentState(**{k: data.get(k, getattr(AgentState(), k)) for k in AgentState.__dataclass_fields__})
        except (OSError, ValueError, TypeError) as exc:
            raise StateError(
                f"agent state {self.state_path} is unreadable ({exc}); it guards against submitting a round "
                "twice, so the agent will not guess: fix or delete it (deleting forgets which rounds were sent)"
            ) from exc

    def save(self, state: AgentState) -> None:
        atomic_write_json(self.state_path, asdict(state))

    def save_global(self, blob: bytes) -> None:
        atomic_write_bytes(self.dir / GLOBAL_FILE, blob)

    def record_global(self, state: AgentState, blob: bytes, round_: int, sha256: str) -> None:
        """Persist the global adapter just applied: the file, then its round and hash in the state."""
        self.save_global(blob)
        state.global_round, state.global_sha256 = round_, sha256
        self.save(state)

    def load_global(self) -> Optional[bytes]:
        path = self.dir / GLOBAL_FILE
        return path.read_bytes() if path.exists() else None

    def stash_update(self, state: AgentState, round_: int, blob: bytes) -> None:
        """Store a round's update, then record the round as submitted (in that order)."""
        atomic_write_bytes(self.dir / OUTBOX_FILE, blob)
        state.last_submitted_round = round_
        state.outbox_round = round_
        state.outbox_sent = False
        self.save(state)

    def record_given(self, state: AgentState, round_: int) -> None:
        """A secure round's update was given (masked, and listed for unmasking): the round counts as submitted.
        Nothing goes to the outbox: a secure round's update is never stored or sent in the clear."""
        state.last_submitted_round = round_
        self.save(state)

    def outbox(self) -> Optional[bytes]:
        path = self.dir / OUTBOX_FILE
        return path.read_bytes() if path.exists() else None

    def mark_sent(self, state: AgentState) -> None:
        state.outbox_sent = True
        self.save(state)

    def start_run(self, state: AgentState, federation: Optional[str], run_id: str) -> None:
        """A fresh record of submitted rounds for (federation, run_id); the old outbox is deleted."""
        state.forget_submissions()
        state.federation, state.run_id = federation, run_id
        self.save(state)
        with contextlib.suppress(FileNotFoundError):
            (self.dir / OUTBOX_FILE).unlink()
