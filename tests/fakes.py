"""Test doubles shared by the test modules: a clock, paho's client without a broker, a trainer without ONNX
Runtime, message builders, and an aggregator and an agent wired to them. Imports neither torch nor onnxruntime."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from flora.broker.aggregator import Aggregator, AggregatorConfig
from flora.edge import adapter, signing
from flora.edge.agent import Agent, AgentConfig, open_state
from flora.edge.agent_rules import Trust
from flora.edge.bundle import Bundle, Manifest
from flora.edge.fileio import sha256_bytes
from flora.edge.identity import CA_CERT, load_ca, load_identity
from flora.edge.local_data import DeviceData
from flora.edge.mqtt import BrokerConfig, make_client
from flora.edge.protocol import Metrics, RoundAnnouncement, Status, Topics, TrainConfig
from flora.edge.secagg.messages import peek_context
from flora.edge.secagg.session import SecureSession, SessionStep
from flora.edge.state import StateStore
from flora.edge.synthetic import encode_update, random_adapter, synthetic_manifest
from flora.edge.trainers.base import StepResult, Trainer, score_logits
from flora.edge.training import LocalData

OFFLINE_BROKER = BrokerConfig.from_url("mqtt://127.0.0.1:1")  # never connected to


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
                           broker=kw.pop("broker", OFFLINE_BROKER), state_dir=state_dir, federation="fed",
                           **kw)
    return Aggregator(cfg, client if client is not None else FakeMqttClient(), clock=clock)


class FakeTrainer(Trainer):
    """A trainer in numpy, for the agent's logic: logits are a fixed random projection of the inputs, and each
    step moves every LoRA tensor by -lr (so an update differs from the global it trained from). It checks
    batches and adapters as a real trainer does and records what it was asked: `steps` (batch sizes),
    `evaluated` (batch sizes), `resets` (reset_optimizer calls). `fail_with` makes train_step raise it."""

    name = "fake"

    def __init__(self, bundle: Bundle) -> None:
        super().__init__(bundle)
        m = self.manifest
        width = int(np.prod(m.input_shape(1)[1:]))
        self._projection = np.random.default_rng(0).standard_normal((width, m.num_classes)).astype(np.float32)
        self._tensors = {t.name: np.zeros(t.shape, np.float32) for t in m.trainable}
        self.steps: List[int] = []
        self.evaluated: List[int] = []
        self.resets = 0
        self.fail_with: Optional[Exception] = None

    def train_step(self, inputs: np.ndarray, labels: np.ndarray) -> StepResult:
        self.check_batch(inputs, labels)
        if self.fail_with is not None:
            raise self.fail_with
        self.steps.append(len(labels))
        for value in self._tensors.values():
            value -= np.float32(self.lr)
        return score_logits(self.logits(inputs), labels)

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        return inputs.reshape(len(inputs), -1).astype(np.float32) @ self._projection

    def evaluate_batch(self, inputs: np.ndarray, labels: np.ndarray) -> StepResult:
        self.evaluated.append(len(labels))
        return super().evaluate_batch(inputs, labels)

    def get_adapter(self) -> Dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._tensors.items()}

    def set_adapter(self, tensors: Dict[str, np.ndarray]) -> None:
        self.check_adapter(tensors)
        self._tensors = {k: np.array(v, np.float32) for k, v in tensors.items()}

    @classmethod
    def runs_here(cls) -> bool:
        return True

    def set_weight_decay(self, weight_decay: float) -> bool:
        self.weight_decay = float(weight_decay)
        return True

    def reset_optimizer(self) -> None:
        self.resets += 1


def feature_data(manifest: Manifest, n: int, seed: int = 0) -> LocalData:
    """`n` random feature vectors with labels cycling through the classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % manifest.num_classes
    return LocalData(labels, features=rng.standard_normal((n, manifest.feature_dim)).astype(np.float32))


def offline_agent(state_dir: Path, *, manifest: Optional[Manifest] = None, train: int = 18, val: int = 6,
                  client: Optional[FakeMqttClient] = None, trainer: Optional[Trainer] = None,
                  trust: Optional[Trust] = None, secure: Optional[SecureSession] = None,
                  agent_class: type = Agent, **overrides: Any) -> Agent:
    """Agent `dev-1` of federation `fed` on a synthetic manifest, with a FakeTrainer, `train` + `val` random
    feature vectors and a FakeMqttClient (`agent.client`); its state dir is opened as `Agent.open` does.
    `agent_class`: an Agent subclass to build instead (the simulator's poisoned device)."""
    m = manifest or synthetic_manifest()
    bundle = Bundle(state_dir.parent / "no-bundle", m)  # never read: the parts are given
    cfg = AgentConfig(bundle=bundle.root, data=state_dir.parent / "no-data", broker=OFFLINE_BROKER, client_id="dev-1",
                      federation="fed", state_dir=state_dir, progress_every_s=0.0, publish_timeout_s=0.2)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    store = StateStore(state_dir)
    state = open_state(store, cfg.client_id, m.model_id, cfg.federation)
    return agent_class(cfg, bundle=bundle, trainer=trainer or FakeTrainer(bundle),
                 data=DeviceData(feature_data(m, train, 0), feature_data(m, val, 1)), store=store, state=state,
                 client=client if client is not None else FakeMqttClient(), trust=trust, secure=secure)


def offer_round(agent: Agent, round_: int, run_id: str = "run-a", protocol: int = 1,
                tensors: Optional[Mapping[str, np.ndarray]] = None, epochs: int = 1, **announced: Any) -> bytes:
    """Queue `global` and `round` for a round (batch 4), as the broker delivers the retained messages; the
    global's bytes. `tensors` default to random_adapter(manifest, 0); `announced` overrides announcement fields."""
    m = agent.manifest
    tensors = tensors if tensors is not None else random_adapter(m, 0)
    blob = adapter.encode(tensors, model_id=m.model_id, round=round_, kind="global")
    fields = dict(round=round_, model_id=m.model_id, state="training",
                  config=TrainConfig(epochs=epochs, lr=5e-3, batch_size=4), clients="all",
                  deadline=time.time() + 600, global_sha256=sha256_bytes(blob), total_rounds=5, protocol=protocol,
                  run_id=run_id)
    fields.update(announced)
    agent.events.put(("global", blob))
    agent.events.put(("round", RoundAnnouncement(**fields).to_json()))
    return blob


def updates(agent: Agent) -> List[adapter.Adapter]:
    """The updates the agent published (decoded against its manifest)."""
    return [adapter.decode(p, agent.manifest.trainable) for p in agent.client.of("update")]


class LiveFederation:
    """The real Aggregator and `n` real Agents (FakeTrainer, synthetic manifest, federation `fed`) in threads of
    this process, each with its own paho client on a real broker at `url`: the protocol end to end over MQTT,
    without bundles, torch or onnxruntime. `agent_kw(i)` and `aggregator_kw` go to offline_agent and
    offline_aggregator; agents exit once the federation is done."""

    def __init__(self, url: str, root: Path, n: int, aggregator_kw: Optional[Dict[str, Any]] = None,
                 agent_kw: Callable[[int], Dict[str, Any]] = lambda i: {}) -> None:
        self.broker = BrokerConfig.from_url(url)
        self.root = root
        kw = dict(rounds=2, round_timeout_s=30.0, metrics_grace_s=0.2, wait_for_clients=n, wait_timeout_s=60.0)
        kw.update(aggregator_kw or {})
        self.aggregator_kw = kw
        self.aggregator = offline_aggregator(root / "aggregator", time.time,
                                             make_client(self.broker, "flora-aggregator"), broker=self.broker, **kw)
        self.agents: List[Agent] = []
        for i in range(n):
            cid = f"dev-{i}"
            will = Status(cid, "offline").to_json()
            client = make_client(self.broker, cid, will_topic=Topics("fed").status(cid), will_payload=will)
            extra = dict(agent_kw(i))
            self.agents.append(offline_agent(root / cid / "state", client=client, broker=self.broker, client_id=cid,
                                             exit_when_done=True, publish_timeout_s=10.0, **extra))
        self.threads: List[Any] = []
        self.errors: List[BaseException] = []
        self.results: Dict[str, Any] = {}

    def _run(self, name: str, target: Callable[[], Any]) -> None:
        try:
            self.results[name] = target()
        except BaseException as exc:  # reported by wait()
            self.errors.append(exc)

    def start(self, agents: Optional[Iterable[int]] = None) -> LiveFederation:
        for name, target in [("aggregator", self.aggregator.run),
                             *((a.cfg.client_id, a.run) for i, a in enumerate(self.agents)
                               if agents is None or i in set(agents))]:
            thread = threading.Thread(target=self._run, args=(name, target), name=name, daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def restart_aggregator(self, **changes: Any) -> Aggregator:
        """A new aggregator process, as it were: the same state dir, client id and config (with `changes`),
        started in a thread in place of the first (which must have returned)."""
        assert not self.threads[0].is_alive()
        kw = {**self.aggregator_kw, **changes}
        agg = offline_aggregator(self.root / "aggregator", time.time, make_client(self.broker, "flora-aggregator"),
                                 broker=self.broker, **kw)
        thread = threading.Thread(target=self._run, args=("aggregator", agg.run), name="aggregator", daemon=True)
        thread.start()
        self.threads[0] = thread
        self.restarted = agg
        return agg

    def wait(self, timeout: float) -> Dict[str, Any]:
        """Wait until the aggregator and every started agent returned (AssertionError after `timeout` s)."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        if self.errors:
            raise self.errors[0]
        assert not alive, f"still running after {timeout:.0f} s: {alive}"
        return self.results

    def stop(self) -> None:
        self.aggregator.stop()
        if getattr(self, "restarted", None) is not None:
            self.restarted.stop()
        for agent in self.agents:
            agent.stop()
        for thread in self.threads:
            thread.join(10)


def enrolled(pki: Any, device_id: str, folder: Path) -> Dict[str, Any]:
    """Enroll `device_id` with `pki` (a broker.enroll.FederationPKI) into `folder`; the offline_agent keywords of
    that device: the aggregator key it trusts and its secure-aggregation session."""
    out = pki.enroll(device_id, folder)
    ca = load_ca(out / CA_CERT)
    key = pki.signer().public_key()
    identity = load_identity(out, device_id, pki.federation, ca)
    return dict(trust=Trust(pki.federation, key), secure=SecureSession(identity, ca, key))


class ScriptedSession(SecureSession):
    """A device's secure-aggregation session that records the update it is given (`deltas`: round -> flat delta,
    `weights`, `noises`, `encodings`) and goes silent from a stage on in chosen attempts (`drop_at`: attempt ->
    stage, e.g. {0: "masked-input"}: in attempt 0 it neither sees nor answers anything from that stage on), as a
    device that drops out mid-protocol (its session stays: it is back for the next attempt)."""

    ORDER = ("advertise-keys", "share-keys", "masked-input", "unmask", "reveal", "abort")

    def __init__(self, *args: Any, drop_at: Optional[Mapping[int, str]] = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.drop_at = dict(drop_at or {})
        self.silent: set = set()  # attempts it has dropped out of
        self.deltas: Dict[int, np.ndarray] = {}
        self.weights: Dict[int, int] = {}
        self.noises: Dict[int, Optional[np.ndarray]] = {}  # round -> its integer DP noise share (distributed DP)
        self.encodings: Dict[int, Any] = {}  # round -> the round's secure encoding

    def trained(self, delta: np.ndarray, weight: int, noise: Optional[np.ndarray] = None):
        if self.round is not None:
            self.deltas[self.round[1]], self.weights[self.round[1]] = np.array(delta), int(weight)
            self.noises[self.round[1]] = None if noise is None else np.array(noise)
            self.encodings[self.round[1]] = self.params.encoding if self.params is not None else None
        return super().trained(delta, weight, noise)

    def on_stage(self, payload: bytes):
        if payload and signing.is_signed(payload):
            body = signing.body_of(payload)
            try:
                ctx, stage = peek_context(body, self.federation), json.loads(body)["stage"]
            except (ValueError, KeyError):
                return super().on_stage(payload)
            drop = self.drop_at.get(ctx.attempt)
            if drop is not None and self.ORDER.index(stage) >= self.ORDER.index(drop):
                self.silent.add(ctx.attempt)
            if ctx.attempt in self.silent:
                return SessionStep()
        return super().on_stage(payload)

    def on_inbox(self, payload: bytes):
        if self.client is not None and self.client.ctx.attempt in self.silent:
            return SessionStep()
        return super().on_inbox(payload)


def scripted(pki: Any, device_id: str, folder: Path, drop_at: Optional[Mapping[int, str]] = None) -> Dict[str, Any]:
    """`enrolled`, with a ScriptedSession."""
    kw = enrolled(pki, device_id, folder)
    s = kw["secure"]
    kw["secure"] = ScriptedSession(s.identity, s.ca, s.aggregator_key, drop_at=drop_at)
    return kw


def started_aggregator(state_dir: Path, rounds: int, **kw: Any) -> Aggregator:
    """`offline_aggregator`, started (or resumed) over `state_dir`, with clients a, b and c online."""
    agg = offline_aggregator(state_dir, FakeClock(), rounds=rounds, **kw)
    agg._resume_or_start()
    for c in ("a", "b", "c"):
        agg.handle("status", c, status(c))
    return agg


def one_round(agg: Aggregator, updates: Sequence[Mapping[str, np.ndarray]], samples: Sequence[int]) -> None:
    """Open the next round, fold one update per client (a, b, c, ...) and close it."""
    agg._open_round()
    for client, tensors, n in zip("abc", updates, samples):
        agg.handle("update", client, encode_update(agg.manifest, tensors, client, agg.state.round, n))
    agg._close_round()


def run_rounds(state_dir: Path, rounds: int, **kw: Any) -> Aggregator:
    """Rounds of one client's update (seeded by round), each closed at once, until the aggregator is done."""
    agg = started_aggregator(state_dir, rounds, **kw)
    while not agg.state.done:
        one_round(agg, [random_adapter(agg.manifest, agg.state.round + 1)], [5])
    return agg
