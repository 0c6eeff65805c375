"""The agent's rules as pure decisions: what a message means for this device and what to do next.

No I/O, no clock, no logging. `flora.edge.agent` is the thin layer around them: it turns each message
into a decision here, carries the decision out (train, publish, persist) and logs a decision's `Note`
once per key. The rules see the agent through a frozen `AgentView` of its state:

- `adopt_state`: at start-up, whether the state dir's record belongs to this model and federation.
- `authenticate`: the aggregator's signature on a `global` or `round` payload (when the agent trusts a
  key), checked before anything reads the body.
- `read_round` / `read_global`: a `round` or `global` payload, accepted or refused with a reason.
- `enter_round`: what an accepted announcement changes: a new federation run forgets the record of
  submitted rounds (`StartRun`); after a restart the stored, unacknowledged update is re-sent once
  (`Resend`).
- `next_action`: `Train`, `Idle` (with its reason) or `Finish` for the round announced now.

New rules for the agent's side of the protocol (docs/protocol.md) belong here, with tests in
tests/test_agent_rules.py that need no bundle, torch or onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import FrozenSet, Optional, Tuple, Union

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import adapter, signing
from .bundle import Manifest
from .fileio import sha256_bytes
from .protocol import (
    BAD_GLOBAL,
    PROTOCOL_MISMATCH,
    PROTOCOL_VERSION,
    ROUND_DONE,
    ProtocolError,
    RoundAnnouncement,
    newer_protocol,
)
from .protocol import MODEL_MISMATCH as MODEL_MISMATCH_CODE
from .state import AgentState

INFO, WARNING, ERROR = "info", "warning", "error"

# Why the agent does not train now (`Idle.reason`).
NO_ROUND = "no-round"
MODEL_MISMATCH = "model-mismatch"
FINISHED = "finished"
NOT_ASKED = "not-asked"
SUBMITTED = "submitted"
FAILED = "failed-in-this-process"
WAITING_FOR_GLOBAL = "waiting-for-global"
SECURE_UNAVAILABLE = "secure-aggregation-unavailable"  # a secure round, and this agent has no identity for it
SECURE_REQUIRED = "secure-aggregation-required"  # a plain round, and this agent sends its update masked only
SECURE_WAITING = "secure-aggregation-waiting"  # trained: the update waits for an attempt to take it

#: How far past the highest round it has seen in a run an announced round may be (`--max-round-jump`).
DEFAULT_MAX_ROUND_JUMP = 1000

# Why start-up does not keep the stored record (`Adoption.reset`).
OTHER_MODEL = "other-model"
OTHER_FEDERATION = "other-federation"


@dataclass(frozen=True)
class Note:
    """A log line a decision asks for; the agent logs each non-empty `key` once per process."""

    level: str  # INFO, WARNING or ERROR
    text: str
    key: str = ""  # "" : every time


@dataclass(frozen=True)
class AgentView:
    """What the rules see of the agent: its identity, its record of submitted rounds (the state dir), and
    what this process remembers (a re-send still owed, an update in flight, rounds that failed here)."""

    client_id: str
    model_id: str
    run_id: str = ""  # the federation run the record of submitted rounds is for
    last_submitted_round: Optional[int] = None
    outbox_round: Optional[int] = None
    outbox_pending: bool = False  # an update is stored that the broker has not acknowledged
    resend_pending: bool = False  # ... stored before this process started, and not re-sent yet
    in_flight: bool = False  # this process published an update the broker has not acknowledged yet
    failed: FrozenSet[Tuple[str, int]] = field(default_factory=frozenset)  # (run_id, round) failed here
    global_sha256: Optional[str] = None  # of the last global adapter received (and accepted)
    finished: bool = False  # this process has seen the federation done
    secure_capable: bool = False  # it has an identity and the aggregator's key: it can take part in secure rounds
    secure_required: bool = False  # `--secure-aggregation`: it takes part in secure rounds only
    holding: Optional[Tuple[str, int]] = None  # (run_id, round) whose trained update waits for a secure attempt
    # (run_id, round, attempt) of the aggregator's requests to send an update again that this process served
    resent: FrozenSet[Tuple[str, int, int]] = field(default_factory=frozenset)
    highest_round: Optional[int] = None  # the highest round announced in this run so far (or submitted)

    @classmethod
    def of(cls, state: AgentState, client_id: str, model_id: str, **process) -> AgentView:
        """The view of a persisted state plus this process's memory (`resend_pending`, `in_flight`, ...)."""
        return cls(client_id, model_id, state.run_id, state.last_submitted_round, state.outbox_round,
                   state.outbox_pending, **process)

    def submitted(self, round_: int) -> bool:
        return self.last_submitted_round is not None and round_ <= self.last_submitted_round


# -- start-up ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Adoption:
    """What start-up does with the stored state: keep it (`reset` None) or start afresh, and what to say."""

    reset: Optional[str]  # None, OTHER_MODEL (a fresh state) or OTHER_FEDERATION (a fresh record of rounds)
    notes: Tuple[Note, ...] = ()


def adopt_state(stored: AgentState, model_id: str, federation: str, where: str = "state dir") -> Adoption:
    """A state dir of another model starts a fresh state; one that recorded another federation's rounds
    starts a fresh record of submitted rounds; otherwise the agent resumes from it."""
    if stored.model_id not in (None, model_id):
        return Adoption(OTHER_MODEL, (Note(WARNING, f"{where} belongs to model {stored.model_id[:16]}; this bundle "
                                                    f"is {model_id[:16]}: starting a fresh state"),))
    if stored.federation not in (None, federation):
        return Adoption(OTHER_FEDERATION, (Note(WARNING, f"{where} recorded the rounds of federation "
                                                         f"{stored.federation!r}, this is {federation!r}: starting "
                                                         "a fresh record of submitted rounds"),))
    notes = []
    if stored.last_submitted_round is not None:
        notes.append(Note(INFO, f"resuming: last submitted round {stored.last_submitted_round} "
                                f"(run {stored.run_id or 'unnamed'})"))
    if stored.outbox_pending:
        notes.append(Note(INFO, f"the update of round {stored.outbox_round} is stored but was not acknowledged: "
                                "it is sent once more when the round message arrives"))
    return Adoption(None, tuple(notes))


# -- messages ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    """A message the agent does not act on; `status_error` (if any) goes out as a retained `error` status."""

    note: Note
    status_error: Optional[str] = None
    status_code: Optional[str] = None  # the status's error_code (protocol.MODEL_MISMATCH, ...)
    forget_round: bool = False  # the announcement held so far no longer stands
    # the error is about the round the agent holds (its status names that round, and the aggregator stops
    # waiting for the device in it); False for a message someone else forged: the device still trains
    about_round: bool = True


@dataclass(frozen=True)
class Trust:
    """Whom the agent believes for `global` and `round` (docs/protocol.md, "Signed messages").

    With the aggregator's Ed25519 key (the enrollment snippet's `aggregator_key`, `--aggregator-key`), only
    messages it signed for this federation are accepted. Without one (an open federation, as before
    signatures existed) unsigned messages are accepted, and a signed one is read without being checked.
    """

    federation: str
    aggregator_key: Optional[Ed25519PublicKey] = None

    @property
    def required(self) -> bool:
        return self.aggregator_key is not None


def authenticate(payload: bytes, purpose: str, trust: Optional[Trust], where: str = "") -> Union[bytes, Refused]:
    """The body of a `global` or `round` payload (`purpose`): verified against the trusted key, or refused as
    `unsigned` / `bad-signature` with an error status that names no round (a forger must not make the
    aggregator stop waiting for this device). Without a trusted key the body is taken as it comes.
    `where` (the agent's run and round) keys the note: said once per reason, kind and round."""
    if trust is None or not trust.required:
        return signing.body_of(payload) if signing.is_signed(payload) else payload
    try:
        return signing.verify(trust.aggregator_key, purpose, trust.federation, payload)
    except signing.SignatureError as exc:
        why = f"refused a {purpose} message: {exc.reason}: {exc.detail}"
        return Refused(Note(WARNING, f"{why} (not from the aggregator whose key this agent trusts)",
                            key=f"{exc.reason}-{purpose}-{where}"),
                       status_error=why, status_code=exc.reason, about_round=False)


def read_round(payload: bytes) -> Union[RoundAnnouncement, Refused]:
    """A `round` payload as an announcement; refused when its protocol is newer (the agent then waits for
    one it understands, and says so once per version) or when it is malformed (the last one stands)."""
    newer = newer_protocol(payload)
    if newer is not None:
        reason = f"round message of protocol {newer}, newer than this agent's {PROTOCOL_VERSION}"
        note = Note(ERROR, f"refused a {reason}: upgrade flora-agent; waiting for a round message it understands",
                    key=f"protocol-{newer}")
        return Refused(note, status_error=f"refused {reason}", status_code=PROTOCOL_MISMATCH, forget_round=True)
    try:
        return RoundAnnouncement.from_json(payload)
    except ProtocolError as exc:
        return Refused(Note(WARNING, f"ignored a malformed round message: {exc}"))


@dataclass(frozen=True)
class GlobalAdapter:
    """An accepted `global` payload: the bytes, their sha256 (what a round names) and the decoded adapter."""

    blob: bytes
    sha256: str
    adapter: adapter.Adapter


def read_global(payload: bytes, manifest: Manifest) -> Union[GlobalAdapter, Refused]:
    """A `global` payload checked against the bundle (model, tensors, size, finite values) and its kind."""
    try:
        decoded = adapter.decode(payload, manifest.trainable, model_id=manifest.model_id,
                                 max_bytes=adapter.max_blob_bytes(manifest.trainable))
    except adapter.AdapterError as exc:
        code = MODEL_MISMATCH_CODE if _names_another_model(payload, manifest) else BAD_GLOBAL
        return Refused(Note(ERROR, f"refused the global adapter: {exc}"), status_error=f"refused global adapter: {exc}",
                       status_code=code)
    if decoded.meta.kind not in ("global", "initial"):
        return Refused(Note(ERROR, f"refused the global adapter: its kind is {decoded.meta.kind!r}"))
    return GlobalAdapter(payload, sha256_bytes(payload), decoded)


def _names_another_model(payload: bytes, manifest: Manifest) -> bool:
    """Whether a refused global's header names another model (the device then holds the wrong bundle)."""
    try:
        _, meta = adapter.read_header(payload)
    except adapter.AdapterError:
        return False
    return isinstance(meta.get("model_id"), str) and meta["model_id"] != manifest.model_id


# -- an announcement arrives -----------------------------------------------------------------------


@dataclass(frozen=True)
class StartRun:
    """A round of another federation run: start a fresh record of submitted rounds (the outbox goes, and
    with it any re-send still owed and the update in flight)."""

    run_id: str
    note: Note


@dataclass(frozen=True)
class Resend:
    """Send the stored update of `round` once more: a restarted agent's unacknowledged one (`attempt` 0), or
    the aggregator's request number `attempt` (its announcement's `resend`: the update never reached it)."""

    round: int
    attempt: int = 0


def enter_round(announcement: RoundAnnouncement, view: AgentView) -> Tuple[Union[StartRun, Resend], ...]:
    """What an accepted announcement changes, in order: another run_id starts a fresh record (an empty
    run_id, from an older aggregator, keeps it); then a re-send still owed goes out, never beside an
    update in flight."""
    effects = []
    run_id = announcement.run_id
    starts = bool(run_id) and run_id != view.run_id
    if starts:
        effects.append(StartRun(run_id, _start_run_note(run_id, view)))
    elif view.resend_pending and view.outbox_pending and not view.in_flight and view.outbox_round is not None:
        effects.append(Resend(view.outbox_round))
    else:
        attempt = announcement.resend.get(view.client_id, 0)
        if (attempt and view.outbox_round == announcement.round and not view.in_flight
                and (run_id, announcement.round, attempt) not in view.resent):
            effects.append(Resend(announcement.round, attempt))
    return tuple(effects)


def check_round_jump(announcement: RoundAnnouncement, view: AgentView, max_jump: int) -> Optional[Refused]:
    """A round far past the highest this agent has seen in the run (more than `max_jump` ahead; 0: no bound)
    is refused: a forged `round: 10**8` on an open broker would otherwise make the agent record it as
    submitted and skip every real round after it. A new run_id starts again from any round."""
    if max_jump <= 0 or view.highest_round is None or announcement.run_id != view.run_id:
        return None
    if announcement.round <= view.highest_round + max_jump:
        return None
    return Refused(Note(WARNING, f"refused round {announcement.round}: more than {max_jump} rounds past round "
                                 f"{view.highest_round}, the highest this agent has seen in run "
                                 f"{view.run_id or 'unnamed'} (--max-round-jump)",
                        key=f"jump-{announcement.run_id}-{announcement.round}"))


def _start_run_note(run_id: str, view: AgentView) -> Note:
    if view.last_submitted_round is None and not view.outbox_pending:
        return Note(INFO, f"federation run {run_id}")
    dropped = f", dropping the unsent update of round {view.outbox_round}" if view.outbox_pending else ""
    return Note(WARNING, f"federation run {run_id} (the record was for run {view.run_id or 'unnamed'}): forgetting "
                         f"that rounds up to {view.last_submitted_round} were submitted{dropped}")


# -- what to do now ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Train:
    round: int


@dataclass(frozen=True)
class Idle:
    reason: str
    note: Optional[Note] = None
    status_error: Optional[str] = None  # goes out as a retained `error` status with `status_code`, with the note
    status_code: Optional[str] = None


@dataclass(frozen=True)
class Finish:
    """The federation is done: go idle (and exit with --exit-when-done)."""

    total_rounds: int
    note: Note


Action = Union[Train, Idle, Finish]


def next_action(announcement: Optional[RoundAnnouncement], view: AgentView) -> Action:
    """Train the announced round only if it is for this model, asks this client, was not submitted in this
    run, can be sent the way it is aggregated (a secure round needs an enrolled identity; an agent that
    sends masked updates only trains secure rounds), is not trained already and waiting for a secure
    attempt, did not fail in this process, and its global (by sha256) is the one received. Checked in
    that order; the first that does not hold is the `Idle` reason."""
    r = announcement
    if r is None:
        return Idle(NO_ROUND)
    tag = f"{r.run_id}/{r.round}"
    if r.model_id != view.model_id:
        why = f"round {r.round} is for model {r.model_id[:16]}, this bundle is {view.model_id[:16]}"
        return Idle(MODEL_MISMATCH, Note(ERROR, f"{why}: not training", key=f"model-{tag}"), status_error=why,
                    status_code=MODEL_MISMATCH_CODE)
    if r.state == ROUND_DONE:
        if view.finished:
            return Idle(FINISHED)
        return Finish(r.total_rounds, Note(INFO, f"the federation is done after {r.total_rounds} rounds"))
    if not r.asks(view.client_id):
        return Idle(NOT_ASKED, Note(INFO, f"round {r.round} does not ask this client", key=f"skip-{tag}"))
    if view.submitted(r.round):
        return Idle(SUBMITTED, Note(INFO, f"round {r.round} was already submitted", key=f"done-{tag}"))
    if r.secure and not view.secure_capable:
        why = f"round {r.round} runs secure aggregation and this agent has no enrolled identity for it"
        return Idle(SECURE_UNAVAILABLE, Note(ERROR, f"{why} (--identity-dir): not training", key=f"secure-{tag}"),
                    status_error=why, status_code=SECURE_UNAVAILABLE)
    if not r.secure and view.secure_required:
        why = f"round {r.round} is not securely aggregated and this agent sends its update masked only"
        return Idle(SECURE_REQUIRED, Note(WARNING, f"{why} (--secure-aggregation): not training", key=f"plain-{tag}"),
                    status_error=why, status_code=SECURE_REQUIRED)
    if r.secure and view.holding == (r.run_id, r.round):
        return Idle(SECURE_WAITING)
    if (r.run_id, r.round) in view.failed:
        return Idle(FAILED, Note(INFO, f"round {r.round} failed in this process: not retrying it; waiting for the "
                                       "next round", key=f"failed-{tag}"))
    if view.global_sha256 != r.global_sha256:
        return Idle(WAITING_FOR_GLOBAL, Note(INFO, f"round {r.round}: waiting for its global adapter",
                                             key=f"wait-{tag}-{view.global_sha256}"))
    return Train(r.round)
