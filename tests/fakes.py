"""Test doubles shared by the test modules: a clock, paho's client without a broker, message builders and an
aggregator wired to the fake client. Imports neither torch nor onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

from flora.broker.aggregator import Aggregator, AggregatorConfig
from flora.edge import adapter
from flora.edge.mqtt import BrokerConfig
from flora.edge.protocol import Metrics, RoundAnnouncement, Status
from flora.edge.synthetic import random_adapter, synthetic_manifest


class FakeClock:
    """A clock that moves only when a test sets or advances `t`."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def status(client: str, state: str = "online") -> bytes:
    """A `status/<client>` payload."""
    return Status(client, state).to_json()


def metrics(client: str, rnd: int, accuracy: float) -> bytes:
    """A `metrics/<client>` payload for round `rnd` (loss 0.5, 10 samples, 2 steps)."""
    return Metrics(client, rnd, 0.5, accuracy, None, 10, 2, 1, 1.0, 0.1, 100.0, "step").to_json()


class Published(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool

    @property
    def kind(self) -> str:
        """`update`, `status`, `global`, ...: the part after `flora/<federation>/`."""
        return self.topic.split("/")[2]


class FakeMessageInfo:
    """paho's MessageInfo: `is_published()` turns True once the (fake) broker acknowledged the message."""

    def __init__(self, mid: int) -> None:
        self.mid = mid
        self.rc = 0
        self.published = False

    def is_published(self) -> bool:
        return self.published

    def wait_for_publish(self, timeout: Optional[float] = None) -> None:
        return None


class FakeMqttClient:
    """paho's Client as the agent and the aggregator use it, with no broker and no network thread.

    Publishes are recorded and acknowledged at once (`on_publish` is called as paho's thread would),
    except those on a held topic kind (`hold`), which wait for `acknowledge(mid)`. `ack(mid, qos)` is
    the client acknowledging a message it received (the aggregator's manual PUBACK): recorded in `acks`,
    and `on_ack` (if set) runs at that moment, so a test can see what was on disk when the ack went out.
    """

    def __init__(self, hold: Iterable[str] = ()) -> None:
        self.published: List[Published] = []
        self.acks: List[Tuple[int, int]] = []
        self.hold = set(hold)
        self.subscriptions: List[Any] = []
        self.manual_ack = False
        self.on_publish: Optional[Callable[..., None]] = None
        self.on_message: Optional[Callable[..., None]] = None
        self.on_connect: Optional[Callable[..., None]] = None
        self.on_disconnect: Optional[Callable[..., None]] = None
        self.on_ack: Optional[Callable[[int, int], None]] = None
        self._infos: Dict[int, FakeMessageInfo] = {}

    # -- what the code under test calls ---------------------------------------------------------
    def publish(self, topic: str, payload: Optional[bytes] = None, qos: int = 0, retain: bool = False
                ) -> FakeMessageInfo:
        info = FakeMessageInfo(len(self.published) + 1)
        self._infos[info.mid] = info
        message = Published(topic, bytes(payload or b""), qos, retain)
        self.published.append(message)
        if message.kind not in self.hold:
            self.acknowledge(info.mid)
        return info

    def ack(self, mid: int, qos: int) -> int:
        self.acks.append((mid, qos))
        if self.on_ack is not None:
            self.on_ack(mid, qos)
        return 0

    def manual_ack_set(self, on: bool) -> None:
        self.manual_ack = on

    def subscribe(self, topics: Any, qos: int = 0) -> Tuple[int, int]:
        self.subscriptions.append(topics)
        return 0, len(self.subscriptions)

    # -- what a test does as the broker ---------------------------------------------------------
    def acknowledge(self, mid: int) -> None:
        """The broker's PUBACK for the publish `mid` (reported through `on_publish`)."""
        self._infos[mid].published = True
        if self.on_publish is not None:
            self.on_publish(self, None, mid, None, None)

    def mid_of(self, kind: str, index: int = 0) -> int:
        """The mid of the `index`-th publish of a topic kind."""
        return [mid for mid, p in enumerate(self.published, start=1) if p.kind == kind][index]

    # -- reading back -------------------------------------------------------------------------
    def of(self, kind: str) -> List[bytes]:
        return [p.payload for p in self.published if p.kind == kind]

    def acked(self) -> List[int]:
        return [mid for mid, _ in self.acks]

    def statuses(self) -> List[Status]:
        return [Status.from_json(p) for p in self.of("status")]

    def announcements(self) -> List[RoundAnnouncement]:
        return [RoundAnnouncement.from_json(p) for p in self.of("round")]

    def globals(self) -> List[adapter.Adapter]:
        return [adapter.decode(p) for p in self.of("global")]


def offline_aggregator(state_dir: Path, clock: FakeClock, client: Optional[FakeMqttClient] = None,
                       **kw: Any) -> Aggregator:
    """An aggregator of federation `fed` on a synthetic manifest (or `manifest=`), wired to a FakeMqttClient
    (`agg.client`): its publishes are recorded and acknowledged at once."""
    m = kw.pop("manifest", None) or synthetic_manifest()
    cfg = AggregatorConfig(manifest=m, initial_adapter=random_adapter(m, 0),
                           broker=BrokerConfig.from_url("mqtt://127.0.0.1:1"), state_dir=state_dir, federation="fed",
                           **kw)
    return Aggregator(cfg, client if client is not None else FakeMqttClient(), clock=clock)
