"""The MQTT wire protocol between agents and the aggregator (docs/protocol.md says the same in prose).

Topics live under `flora/<federation>/`. Adapter blobs travel as safetensors bytes (edge.adapter);
everything else is UTF-8 JSON, built and parsed here so that both sides agree on every field.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Union

from .errors import FloraError

PREFIX = "flora"
QOS = 1
PROTOCOL_VERSION = 1

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

ROUND_TRAINING = "training"
ROUND_DONE = "done"


class ProtocolError(FloraError, ValueError):
    """A message does not follow the protocol."""


def check_id(value: str, what: str = "client id") -> str:
    """Client ids and federation names: 1-64 of letters, digits, '_', '-', '.' (no MQTT wildcards)."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ProtocolError(f"invalid {what} {value!r}: use 1-64 letters, digits, '_', '-' or '.'")
    return value


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
        """The client id in `flora/<fed>/<kind>/<id>`, or None if the topic is not of that kind."""
        prefix = f"{self.base}/{kind}/"
        if not topic.startswith(prefix):
            return None
        client = topic[len(prefix) :]
        return client if _ID.match(client) else None


@dataclass(frozen=True)
class TrainConfig:
    """What the aggregator asks each client to run in a round."""

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ProtocolError(f"epochs and batch_size must be >= 1 (got {self.epochs}, {self.batch_size})")
        if not (self.lr > 0) or self.weight_decay < 0:
            raise ProtocolError(f"lr must be > 0 and weight_decay >= 0 (got {self.lr}, {self.weight_decay})")


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

    def asks(self, client_id: str) -> bool:
        return self.state == ROUND_TRAINING and (self.clients == "all" or client_id in self.clients)

    def to_json(self) -> bytes:
        d = asdict(self)
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, payload: Union[bytes, str]) -> RoundAnnouncement:
        d = _load_object(payload, "round")
        try:
            clients = d["clients"]
            if clients != "all":
                clients = [check_id(c) for c in clients]
            if d["state"] not in (ROUND_TRAINING, ROUND_DONE):
                raise ProtocolError(f"round state {d['state']!r} is unknown")
            return cls(
                round=int(d["round"]),
                model_id=str(d["model_id"]),
                state=str(d["state"]),
                config=TrainConfig(**d["config"]),
                clients=clients,
                deadline=float(d["deadline"]),
                global_sha256=str(d["global_sha256"]),
                total_rounds=int(d["total_rounds"]),
                protocol=int(d.get("protocol", PROTOCOL_VERSION)),
                run_id=str(d.get("run_id", "")),
            )
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed round message: {type(exc).__name__}: {exc}") from exc


STATUS_STATES = ("online", "idle", "training", "offline", "error")


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

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, payload: Union[bytes, str]) -> Status:
        d = _load_object(payload, "status")
        try:
            state = str(d["state"])
            if state not in STATUS_STATES:
                raise ProtocolError(f"status state {state!r} is not one of {STATUS_STATES}")
            return cls(
                client_id=check_id(str(d["client_id"])),
                state=state,
                round=None if d.get("round") is None else int(d["round"]),
                last_error=d.get("last_error"),
                num_samples=None if d.get("num_samples") is None else int(d["num_samples"]),
                backend=d.get("backend"),
                ts=float(d.get("ts", 0.0)),
            )
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed status message: {exc}") from exc


@dataclass(frozen=True)
class Metrics:
    """The `metrics/<id>` message an agent publishes after training a round."""

    client_id: str
    round: int
    loss: float
    accuracy: Optional[float]  # on the local validation split, if any
    train_accuracy: Optional[float]
    samples: int
    steps: int
    epochs: int
    wall_time_s: float
    step_time_s: float
    peak_rss_mb: float
    backend: str
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, payload: Union[bytes, str]) -> Metrics:
        d = _load_object(payload, "metrics")
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})  # type: ignore[arg-type]
        except TypeError as exc:
            raise ProtocolError(f"malformed metrics message: {exc}") from exc


def _load_object(payload: Union[bytes, str], what: str) -> Dict[str, Any]:
    try:
        d = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what} message is not JSON: {exc}") from exc
    if not isinstance(d, dict):
        raise ProtocolError(f"{what} message is not a JSON object")
    return d
