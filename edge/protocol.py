"""The MQTT wire protocol between agents and the aggregator (docs/protocol.md says the same in prose).

Topics live under `flora/<federation>/`. Adapter blobs travel as safetensors bytes (edge.adapter);
everything else is UTF-8 JSON, built and parsed here so that both sides agree on every field. Each
JSON message has one schema (`ROUND_MESSAGE`, `STATUS_MESSAGE`, `METRICS_MESSAGE`, edge.wire): its
receiver decodes it through that schema (bounded size and nesting, exact keys and types, finite
numbers in range) and its sender encodes through it too, so a sender never writes what a receiver
refuses.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from . import wire
from .fileio import json_safe
from .secagg.schema import PARAMS as SECAGG_PARAMS
from .wire import Array, Bool, Const, Float, Int, Map, Message, Nullable, Object, OneOf, Str, optional

PREFIX = "flora"
QOS = 1
#: The QoS devices subscribe `global` and `round` with: both are retained, so every (re)subscription brings
#: the current ones once, and nothing is queued for a device while it is away (a device back after 20
#: rounds downloads one global, not 21). Updates, statuses and metrics stay at QOS.
DOWNLINK_QOS = 0
PROTOCOL_VERSION = 1

_ID = wire.ID_PATTERN

ROUND_TRAINING = "training"
ROUND_DONE = "done"
MODE_SYNC = "sync"
MODE_ASYNC = "async"

#: Bounds of the protocol's numbers and lists (far beyond any real federation, far below an overflow).
MAX_ROUND = 10 ** 9
MAX_CLIENTS = 100_000  # ids in one round's asked list
MAX_SAMPLES = 10 ** 15
MAX_ERROR_CHARS = 1000  # a status's last_error (the agent cuts longer ones)
MAX_TIME = 1e11  # unix seconds (year 5138)

#: The one error of every decoder in this module (and edge.wire, edge.adapter's header): a message that
#: does not follow the protocol; `reason` says how callers count it.
ProtocolError = wire.WireError


def check_id(value: str, what: str = "client id") -> str:
    """Client ids and federation names: 1-64 of letters, digits, '_', '-', '.' (no MQTT wildcards), the whole
    string (a trailing newline is not allowed)."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ProtocolError(f"invalid {what} {wire.short(value, 80)}: use 1-64 letters, digits, '_', '-' or '.'")
    return value


def newer_protocol(payload: bytes) -> Optional[int]:
    """The `protocol` of a JSON message when it is newer than this side's, else None (also for a payload that
    is not a bounded JSON object: its decoder says why)."""
    try:
        value = wire.loads(payload, ROUND_MESSAGE.max_bytes, what="round")
    except wire.WireError:
        return None
    version = value.get("protocol") if isinstance(value, dict) else None
    return version if type(version) is int and version > PROTOCOL_VERSION else None


@dataclass(frozen=True)
class Topics:
    federation: str

    def __post_init__(self) -> None:
        check_id(self.federation, "federation name")

    @property
    def base(self) -> str:
        return f"{PREFIX}/{self.federation}"

    @property
    def global_(self) -> str:
        return f"{self.base}/global"

    @property
    def round(self) -> str:
        return f"{self.base}/round"

    def update(self, client_id: str) -> str:
        return f"{self.base}/update/{check_id(client_id)}"

    def status(self, client_id: str) -> str:
        return f"{self.base}/status/{check_id(client_id)}"

    def metrics(self, client_id: str) -> str:
        return f"{self.base}/metrics/{check_id(client_id)}"

    @property
    def secagg_stage(self) -> str:
        """Secure aggregation: the aggregator opens each stage here (retained, signed)."""
        return f"{self.base}/secagg/stage"

    def secagg_inbox(self, client_id: str) -> str:
        """Secure aggregation: what one client needs for a stage (signed by the aggregator)."""
        return f"{self.base}/secagg/inbox/{check_id(client_id)}"

    def secagg_up(self, client_id: str) -> str:
        """Secure aggregation: a client's messages to the aggregator."""
        return f"{self.base}/secagg/up/{check_id(client_id)}"

    @property
    def all_secagg_up(self) -> str:
        return f"{self.base}/secagg/up/+"

    def downlink(self) -> List[Tuple[str, int]]:
        """What a device subscribes to, with its QoS: the retained `global` and `round` at DOWNLINK_QOS."""
        return [(self.global_, DOWNLINK_QOS), (self.round, DOWNLINK_QOS)]

    @property
    def all_updates(self) -> str:
        return f"{self.base}/update/+"

    @property
    def all_status(self) -> str:
        return f"{self.base}/status/+"

    @property
    def all_metrics(self) -> str:
        return f"{self.base}/metrics/+"

    def client_of(self, topic: str, kind: str) -> Optional[str]:
        """The client id in `flora/<fed>/<kind>/<id>`, or None if the topic is not of that kind (or its id is
        outside the grammar: `split` tells those apart)."""
        parts = self.split(topic)
        return parts[1] if parts is not None and parts[0] == kind and _ID.fullmatch(parts[1]) else None

    def split(self, topic: str) -> Optional[tuple]:
        """(kind, the rest) of a topic `flora/<fed>/<kind>/<rest>` of this federation, else None; `rest` is
        the sender's id as the topic spells it, which may be outside the id grammar."""
        prefix = f"{self.base}/"
        if not topic.startswith(prefix):
            return None
        kind, sep, rest = topic[len(prefix):].partition("/")
        return (kind, rest) if sep else None


_CONFIG = Object({
    "epochs": Int(1, 10_000),
    "lr": Float(gt=0.0, hi=1e3),
    "batch_size": Int(1, 1 << 20),
    "weight_decay": Float(0.0, 1e3),
    "reset_optimizer": optional(Bool(), False),
    "clip_norm": optional(Nullable(Float(gt=0.0, hi=1e6))),
    "noise_std": optional(Nullable(Float(gt=0.0, hi=1e6))),
})
#: round-config keys a round without differential privacy leaves out, so agents that predate them still read it
DP_KEYS = ("clip_norm", "noise_std")


@dataclass(frozen=True)
class TrainConfig:
    """What the aggregator asks each client to run in a round.

    Differential privacy (docs/privacy.md): `clip_norm` C asks each client to clip its update's delta from
    the round's global to L2 norm C before it sends it; `noise_std` (distributed DP) asks it to add its
    share of the Gaussian noise, N(0, noise_std^2) per element, to that clipped delta. An agent that does
    not know these keys refuses the round rather than send an unclipped update.
    """

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    #: zero the client's Adam moments (and step count) before this round's training; sent only when true,
    #: so agents that predate it keep reading every other round message
    reset_optimizer: bool = False
    clip_norm: Optional[float] = None
    noise_std: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        """The config as the round message carries it (the DP keys only when set)."""
        d = asdict(self)
        return {k: v for k, v in d.items() if not (k in DP_KEYS and v is None)}

    def __post_init__(self) -> None:
        if not isinstance(self.reset_optimizer, bool):
            raise ProtocolError(f"reset_optimizer must be true or false, got {self.reset_optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ProtocolError(f"epochs and batch_size must be >= 1 (got {self.epochs}, {self.batch_size})")
        if not (self.lr > 0) or self.weight_decay < 0:
            raise ProtocolError(f"lr must be > 0 and weight_decay >= 0 (got {self.lr}, {self.weight_decay})")
        _CONFIG.check(asdict(self), "config")  # within what a receiver accepts


#: The retained `round` message.
ROUND_MESSAGE = Message("round", Object({
    "round": Int(0, MAX_ROUND),
    "model_id": Str(128),
    "state": Str(choices=(ROUND_TRAINING, ROUND_DONE)),
    "config": _CONFIG,
    "clients": OneOf((Const("all"), Array(Str(64, _ID), MAX_CLIENTS, unique=True))),
    "deadline": Float(0.0, MAX_TIME),
    "global_sha256": Str(64, wire.HEX64),
    "total_rounds": Int(0, MAX_ROUND),
    "protocol": optional(Int(0, 2 ** 31), PROTOCOL_VERSION),
    "run_id": optional(Str(64), ""),
    "mode": optional(Str(choices=(MODE_SYNC, MODE_ASYNC)), MODE_SYNC),  # async only: these three
    "buffer": optional(Int(0, MAX_CLIENTS), 0),
    "max_staleness": optional(Int(0, MAX_ROUND), 0),
    # a secure round (docs/protocol.md, "Secure aggregation"): its parameters; absent in a plain round, so
    # an agent that predates secure aggregation refuses a secure round (an unknown key) and sends nothing
    "secagg": optional(Nullable(SECAGG_PARAMS)),
    "resend": optional(Map(Str(64, _ID), Int(1, 1000), MAX_CLIENTS), {}),
}), max_bytes=8 << 20)


@dataclass(frozen=True)
class RoundAnnouncement:
    """The retained `round` message: which round runs, for which global, with what config."""

    round: int
    model_id: str
    state: str  # ROUND_TRAINING or ROUND_DONE
    config: TrainConfig
    clients: Union[str, List[str]]  # "all" or the list of asked client ids
    deadline: float  # unix time after which the round may close
    global_sha256: str  # sha256 of the `global` payload that this round trains from
    total_rounds: int
    protocol: int = PROTOCOL_VERSION
    # names one federation run (the aggregator's state dir): an agent's record of submitted rounds
    # holds for that run only, so a federation started afresh is trained again from round 0
    run_id: str = ""
    # buffered asynchronous rounds (`mode` "async"): `round` is the global's version, an agent trains from
    # it and tags its update with it; the aggregator publishes a new version every `buffer` updates and
    # accepts updates at most `max_staleness` versions old. Sync messages leave these three keys out.
    mode: str = MODE_SYNC
    buffer: int = 0
    max_staleness: int = 0
    # with secure aggregation: the round's SecAggParams as JSON (the agent sends no plain update then)
    secagg: Optional[Dict[str, Any]] = None
    # client id -> attempt: asked clients whose status says they submitted this round but whose update never
    # reached the aggregator; each sends its stored update of this round again, once per attempt number
    resend: Dict[str, int] = field(default_factory=dict)

    def asks(self, client_id: str) -> bool:
        return self.state == ROUND_TRAINING and (self.clients == "all" or client_id in self.clients)

    @property
    def is_async(self) -> bool:
        return self.mode == MODE_ASYNC

    @property
    def secure(self) -> bool:
        return self.secagg is not None

    def to_json(self) -> bytes:
        d = {**asdict(self), "config": self.config.to_dict()}
        if self.mode == MODE_SYNC:  # a synchronous round message is what it always was
            for key in ("mode", "buffer", "max_staleness"):
                d.pop(key)
        if d["secagg"] is None:  # a plain round says nothing of it (agents that predate it read the message)
            del d["secagg"]
        if not self.config.reset_optimizer:  # sent only when true: agents that predate the key read the rest
            del d["config"]["reset_optimizer"]
        if not d["resend"]:  # only a round that asks a client to send its update again carries it
            d.pop("resend")
        return ROUND_MESSAGE.encode(d)

    @classmethod
    def from_json(cls, payload: Union[bytes, str]) -> RoundAnnouncement:
        d = ROUND_MESSAGE.decode(payload)
        d["config"] = TrainConfig(**d["config"])
        return cls(**d)


STATUS_STATES = ("online", "idle", "training", "offline", "error")
# Why a device is in `error` (Status.error_code). The aggregator never asks a device whose error it cannot
# fix itself (PERMANENT_ERRORS) and does not wait for one that failed the round it is asked for.
MODEL_MISMATCH = "model-mismatch"  # its bundle is of another model: an operator must install the right one
PROTOCOL_MISMATCH = "protocol-mismatch"  # the federation speaks a newer protocol: flora-agent needs an upgrade
BAD_GLOBAL = "bad-global"  # it refused a global adapter (corrupt or invalid): a new global may do
ROUND_FAILED = "round-failed"  # training the round named by `round` failed on the device
PERMANENT_ERRORS = frozenset({MODEL_MISMATCH, PROTOCOL_MISMATCH})
ERROR_CODE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")  # a status's error_code: lower-case words joined by '-'

#: The retained `status/<id>` message.
STATUS_MESSAGE = Message("status", Object({
    "client_id": Str(64, _ID),
    "state": Str(choices=STATUS_STATES),
    "round": optional(Nullable(Int(0, MAX_ROUND))),
    "last_error": optional(Nullable(Str(MAX_ERROR_CHARS))),
    "num_samples": optional(Nullable(Int(0, MAX_SAMPLES))),
    "backend": optional(Nullable(Str(64))),
    "ts": optional(Float(0.0, MAX_TIME), 0.0),
    "error_code": optional(Nullable(Str(32, ERROR_CODE))),
    "submitted": optional(Nullable(Int(0, MAX_ROUND))),
    "wants_global": optional(Nullable(Str(64, wire.HEX64))),
}), max_bytes=16 << 10)


@dataclass(frozen=True)
class Status:
    """The retained `status/<id>` message (the agent's last will says `offline`)."""

    client_id: str
    state: str
    round: Optional[int] = None
    last_error: Optional[str] = None
    num_samples: Optional[int] = None
    backend: Optional[str] = None
    ts: float = 0.0
    # with state `error`: why, as a code (model-mismatch, protocol-mismatch, bad-global, round-failed, ...)
    error_code: Optional[str] = None
    # the last round this device submitted in the run it follows (the aggregator notices an update lost on
    # the way and asks for it again: the announcement's `resend`)
    submitted: Optional[int] = None
    # the sha256 of the global an announced round trains from, while the device does not hold it (the
    # aggregator then publishes its global again)
    wants_global: Optional[str] = None

    def to_json(self) -> bytes:
        d = asdict(self)
        if d["last_error"] is not None and len(d["last_error"]) > MAX_ERROR_CHARS:
            d["last_error"] = d["last_error"][: MAX_ERROR_CHARS - 1] + "…"
        return STATUS_MESSAGE.encode(d)

    @classmethod
    def from_json(cls, payload: Union[bytes, str]) -> Status:
        return cls(**STATUS_MESSAGE.decode(payload))


#: The `metrics/<id>` message: every number finite (a non-finite one is sent as null), `extra` a small map
#: of named numbers.
METRICS_MESSAGE = Message("metrics", Object({
    "client_id": Str(64, _ID),
    "round": Int(0, MAX_ROUND),
    "loss": Nullable(Float()),
    "accuracy": Nullable(Float(0.0, 1.0)),
    "train_accuracy": Nullable(Float(0.0, 1.0)),
    "samples": Int(0, MAX_SAMPLES),
    "steps": Int(0, MAX_SAMPLES),
    "epochs": Int(0, 10_000),
    "wall_time_s": Float(0.0, MAX_TIME),
    "step_time_s": Float(0.0, MAX_TIME),
    "peak_rss_mb": Float(0.0, 1e9),
    "backend": Str(64),
    "extra": optional(Map(Str(64, _ID), Nullable(Float()), 32), {}),
}), max_bytes=16 << 10)


@dataclass(frozen=True)
class Metrics:
    """The `metrics/<id>` message an agent publishes after training a round."""

    client_id: str
    round: int
    loss: Optional[float]
    accuracy: Optional[float]  # on the local validation split, if any
    train_accuracy: Optional[float]
    samples: int
    steps: int
    epochs: int
    wall_time_s: float
    step_time_s: float
    peak_rss_mb: float
    backend: str
    extra: Dict[str, Optional[float]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return METRICS_MESSAGE.encode(json_safe(asdict(self)))

    @classmethod
    def from_json(cls, payload: Union[bytes, str]) -> Metrics:
        return cls(**METRICS_MESSAGE.decode(payload))
