"""flora-agent: trains the bundle's LoRA adapter on this device's images, round by round, over MQTT.

The decisions (what a message means, whether to train) are pure rules in `flora.edge.agent_rules`; this
module carries them out: it trains, publishes, persists and logs. paho's network thread only queues
incoming messages; the main thread applies them, trains and publishes. `Agent.open(cfg)` loads what an
agent needs (bundle, trainer, state, data, a paho client); `Agent(...)` takes those parts and does no
I/O. The protocol is docs/protocol.md.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple

import numpy as np

from . import adapter as adapter_blob
from . import agent_rules as rules
from . import dp
from .bundle import Bundle
from .errors import ConfigError
from .identity import CA_CERT, aggregator_key, load_ca, load_identity
from .local_data import DeviceData, load_device_data
from .logs import fields
from .mqtt import BrokerConfig, Connection, make_client
from .preprocess import ImageError
from .protocol import QOS, ROUND_FAILED, Metrics, ProtocolError, RoundAnnouncement, Status, Topics, check_id
from .secagg.messages import MessageError
from .secagg.params import SecAggParams
from .secagg.session import SecureSession, SessionStep
from .state import AgentState, StateStore
from .trainers import Trainer, TrainerError, open_bundle, open_trainer
from .training import Evaluation, RoundResult, Stopped, eval_batch_size, evaluate, train_round

if TYPE_CHECKING:
    from paho.mqtt.client import Client as MqttClient

    from .prometheus import AgentMetrics

log = logging.getLogger("flora.agent")
LEVELS = {rules.INFO: logging.INFO, rules.WARNING: logging.WARNING, rules.ERROR: logging.ERROR}


@dataclass
class AgentConfig:
    bundle: Path
    data: Path
    broker: BrokerConfig  # BrokerConfig.from_args / from_url: checked before any heavy work
    client_id: str
    federation: str = "default"
    state_dir: Optional[Path] = None  # default: ./flora-state/<client_id>
    backend: str = "auto"
    threads: Optional[int] = None
    providers: Optional[List[str]] = None
    shots: Optional[int] = None
    val_fraction: float = 0.1
    seed: int = 0  # batch order; also the splits unless split_seed is given
    split_seed: Optional[int] = None
    fp16_updates: bool = False
    image_encoder_int8: bool = False  # image features from the bundle's int8 encoder (text mode)
    exit_when_done: bool = False
    progress_every_s: float = 5.0
    feature_batch_size: int = 32
    connect_timeout_s: float = 30.0
    publish_timeout_s: float = 60.0  # how long a round waits for the broker to acknowledge its update
    metrics_port: Optional[int] = None  # serve this agent's figures for Prometheus (`--metrics-port`)
    metrics_host: str = "127.0.0.1"
    slowdown: float = 1.0  # > 1: a straggler for tests and simulations, each round takes this many times as long
    # the aggregator's Ed25519 key (base64, `--aggregator-key`), or a file of it; else identity_dir/aggregator.pub.
    # With one, only `global` and `round` messages it signed are accepted (docs/protocol.md, "Signed messages")
    aggregator_key: Optional[str] = None
    aggregator_key_file: Optional[Path] = None
    identity_dir: Optional[Path] = None  # the folder `flora-aggregator enroll` wrote for this device
    # take part in secure rounds only (`--secure-aggregation`): the update never leaves the device in the clear.
    # Without it an agent with an identity still joins secure rounds, and trains plain ones as before
    secure_aggregation: bool = False
    max_round_jump: int = rules.DEFAULT_MAX_ROUND_JUMP  # refuse rounds this far past the highest seen (0: off)
    #: differential privacy: clip every update's delta to this L2 norm, whatever the round asks (the smaller
    #: of the two when the round asks too): `--dp-clip`
    dp_clip: Optional[float] = None

    def resolved_state_dir(self) -> Path:
        return Path(self.state_dir) if self.state_dir else Path("flora-state") / self.client_id


class Acks:
    """Message ids the broker acknowledged, as paho reports them (`on_publish`, on its network thread).

    Only the latest `keep` are kept (paho reuses a mid only after 65535 others). This, not
    MessageInfo.is_published(), is the source of truth: a message published while disconnected has
    rc NO_CONN, paho sends it on reconnect, and is_published() raises for it even once it is acked.
    """

    def __init__(self, keep: int = 4096) -> None:
        self.keep = keep
        self._mids: OrderedDict[int, Any] = OrderedDict()
        self._lock = threading.Lock()  # never held while calling paho: on_publish runs under paho's lock

    def on_publish(self, client, userdata, mid: int, reason_code=None, properties=None) -> None:
        with self._lock:
            self._mids[mid] = reason_code
            self._mids.move_to_end(mid)
            while len(self._mids) > self.keep:
                self._mids.popitem(last=False)

    def take(self, mid: int) -> Tuple[bool, Any]:
        """(acknowledged, the broker's reason code); forgets the mid."""
        with self._lock:
            if mid not in self._mids:
                return False, None
            return True, self._mids.pop(mid)


@dataclass
class InFlight:
    """The update this process published and the broker has not acknowledged yet."""

    round: int
    mid: int
    gave_up_waiting: bool = False


def open_bundle_and_trainer(cfg: AgentConfig) -> Tuple[Bundle, Trainer]:
    """The bundle, verified for the backend that will run it, and its trainer."""
    bundle, backend = open_bundle(cfg.bundle, cfg.backend)
    trainer = open_trainer(bundle, backend, threads=cfg.threads, providers=cfg.providers)
    m = bundle.manifest
    log.info("bundle %s: %s, LoRA %s tower rank %d, %d classes, model_id %s; trainer %s", bundle.root, m.preset,
             m.lora.tower, m.lora.rank, m.num_classes, m.model_id[:16], trainer.name)
    return bundle, trainer


def open_state(store: StateStore, client_id: str, model_id: str, federation: str) -> AgentState:
    """The stored state, adopted for this model and federation (`agent_rules.adopt_state`), and saved."""
    stored = store.load()
    adoption = rules.adopt_state(stored, model_id, federation, where=f"state dir {store.dir}")
    state = AgentState() if adoption.reset == rules.OTHER_MODEL else stored
    state.client_id, state.model_id = client_id, model_id
    if adoption.reset == rules.OTHER_FEDERATION:
        store.start_run(state, federation, "")
    state.federation = federation
    store.save(state)
    for note in adoption.notes:
        log.log(LEVELS[note.level], "%s", note.text)
    return state


def open_secure(cfg: AgentConfig, trust: rules.Trust) -> Optional[SecureSession]:
    """The secure-aggregation side of an enrolled device (its identity, checked against the federation CA),
    or None without --identity-dir; ConfigError (exit 2) for --secure-aggregation without one."""
    if cfg.identity_dir is None:
        if cfg.secure_aggregation:
            raise ConfigError("--secure-aggregation needs --identity-dir: the folder `flora-aggregator enroll` wrote "
                              "for this device (its identity key and certificate, ca.crt, aggregator.pub)")
        return None
    if trust.aggregator_key is None:
        raise ConfigError(f"--identity-dir {cfg.identity_dir}: no aggregator key (aggregator.pub there, or "
                          "--aggregator-key): secure aggregation checks the aggregator's signature on every stage")
    ca = load_ca(Path(cfg.identity_dir) / CA_CERT)
    identity = load_identity(Path(cfg.identity_dir), cfg.client_id, cfg.federation, ca)
    return SecureSession(identity, ca, trust.aggregator_key)


def open_trust(cfg: AgentConfig) -> rules.Trust:
    """Whom the agent believes for `global` and `round`: the aggregator key the config names, if any
    (IdentityError, exit 2, for one that cannot be read)."""
    return rules.Trust(cfg.federation, aggregator_key(cfg.aggregator_key, cfg.aggregator_key_file, cfg.identity_dir))


class Agent:
    """One device in one federation: `run()` until stopped (or, with exit_when_done, until it is done).

    Takes its parts and does no I/O; `Agent.open(cfg)` loads them. `client` is a paho MQTT client (or a
    fake): the agent sets its callbacks and connects it only in `run()`.
    """

    def __init__(self, cfg: AgentConfig, *, bundle: Bundle, trainer: Trainer, data: DeviceData,
                 store: StateStore, state: AgentState, client: MqttClient,
                 metrics: Optional[AgentMetrics] = None, trust: Optional[rules.Trust] = None,
                 secure: Optional[SecureSession] = None) -> None:
        self.cfg = cfg
        check_id(cfg.client_id)
        self.topics = Topics(cfg.federation)
        self.bundle, self.trainer, self.manifest = bundle, trainer, bundle.manifest
        self.backend = trainer.name
        self.store, self.state = store, state
        self.train_data, self.val_data = data.train, data.val
        self.events: queue.Queue[Tuple[str, bytes]] = queue.Queue()
        self.stop_event = threading.Event()
        self.done = False
        self.round: Optional[RoundAnnouncement] = None
        self.global_: Optional[rules.GlobalAdapter] = None
        self.trust = trust if trust is not None else rules.Trust(cfg.federation)
        self.secure = secure  # secure aggregation (an enrolled device), or None
        if cfg.secure_aggregation and secure is None:
            raise ConfigError("--secure-aggregation needs an enrolled identity (--identity-dir)")
        self.layout = adapter_blob.layout_of(tuple(bundle.manifest.trainable))
        self._said: Set[str] = set()
        self._failed: Set[Tuple[str, int]] = set()  # (run_id, round) that failed in this process
        self._resent: Set[Tuple[str, int, int]] = set()  # (run_id, round, attempt) of the aggregator's requests served
        self._highest_announced: Optional[int] = None  # the highest round announced in this run to this process
        self._inflight: Optional[InFlight] = None
        self._resend_pending = state.outbox_pending  # an update stored before a restart, not acked
        self._acks = Acks()
        self.broker_cfg = cfg.broker
        self.metrics = metrics  # served in run() when given
        self.client = client
        client.on_message = self._on_message
        client.on_publish = self._acks.on_publish
        self.connection = Connection(self.broker_cfg, client, on_connected=self._on_connected)

    @classmethod
    def open(cls, cfg: AgentConfig, client: Optional[MqttClient] = None,
             parts: Optional[Tuple[Bundle, Trainer]] = None) -> Agent:
        """Load the bundle and its trainer (or use `parts`: a simulation's clients share one session), the
        state dir, the local data (features through the cache), and make a paho client with the agent's
        last will (or use `client`). Nothing is connected yet."""
        check_id(cfg.client_id)
        trust = open_trust(cfg)  # identity and keys are checked before the bundle is loaded
        secure = open_secure(cfg, trust)
        bundle, trainer = parts if parts is not None else open_bundle_and_trainer(cfg)
        store = StateStore(cfg.resolved_state_dir())
        state = open_state(store, cfg.client_id, bundle.manifest.model_id, cfg.federation)
        data = load_device_data(cfg.data, bundle, store.dir, shots=cfg.shots, val_fraction=cfg.val_fraction,
                                seed=cfg.seed if cfg.split_seed is None else cfg.split_seed,
                                feature_batch_size=cfg.feature_batch_size, threads=cfg.threads,
                                providers=cfg.providers, progress_every_s=cfg.progress_every_s,
                                image_encoder_int8=cfg.image_encoder_int8)
        if client is None:
            will = Status(cfg.client_id, "offline", None, None, len(data.train), trainer.name, time.time())
            client = make_client(cfg.broker, cfg.client_id, will_topic=Topics(cfg.federation).status(cfg.client_id),
                                 will_payload=will.to_json())
        metrics = None
        if cfg.metrics_port is not None:  # prometheus_client is imported only when asked for
            from .prometheus import AgentMetrics

            metrics = AgentMetrics(cfg.client_id, trainer.name)
        return cls(cfg, bundle=bundle, trainer=trainer, data=data, store=store, state=state, client=client,
                   metrics=metrics, trust=trust, secure=secure)

    def view(self) -> rules.AgentView:
        """The frozen view of this agent the rules decide on."""
        return rules.AgentView.of(self.state, self.cfg.client_id, self.manifest.model_id,
                                  resend_pending=self._resend_pending, in_flight=self._inflight is not None,
                                  failed=frozenset(self._failed),
                                  global_sha256=self.global_.sha256 if self.global_ else None, finished=self.done,
                                  secure_capable=self.secure is not None,
                                  secure_required=self.cfg.secure_aggregation,
                                  holding=self.secure.holding if self.secure is not None else None,
                                  resent=frozenset(self._resent), highest_round=self._highest_round())

    def _highest_round(self) -> Optional[int]:
        seen = [r for r in (self._highest_announced, self.state.last_submitted_round) if r is not None]
        return max(seen) if seen else None

    # -- MQTT callbacks (paho's thread) ------------------------------------------------------
    def _on_connected(self, client) -> None:
        topics = self.topics.downlink()
        if self.secure is not None:
            topics += [(self.topics.secagg_stage, QOS), (self.topics.secagg_inbox(self.cfg.client_id), QOS)]
        client.subscribe(topics)
        self.events.put(("connected", b""))

    def _on_message(self, client, userdata, message) -> None:
        if message.topic == self.topics.global_:
            self.events.put(("global", bytes(message.payload)))
        elif message.topic == self.topics.round:
            self.events.put(("round", bytes(message.payload)))
        elif self.secure is not None and message.topic == self.topics.secagg_stage:
            self.events.put(("secagg-stage", bytes(message.payload)))
        elif self.secure is not None and message.topic == self.topics.secagg_inbox(self.cfg.client_id):
            self.events.put(("secagg-inbox", bytes(message.payload)))

    # -- helpers -----------------------------------------------------------------------------
    def _status(self, state: str, error: Optional[str] = None, code: Optional[str] = None,
                about_round: bool = True, wants_global: Optional[str] = None) -> Status:
        number = self.round.round if self.round and about_round else None
        return Status(self.cfg.client_id, state, number, error, len(self.train_data), self.backend, time.time(), code,
                      submitted=self.state.last_submitted_round, wants_global=wants_global)

    def publish_status(self, state: str, error: Optional[str] = None, code: Optional[str] = None,
                       about_round: bool = True, wants_global: Optional[str] = None) -> None:
        """A retained status; with `error`, a message and an error code the aggregator acts on (`about_round`:
        the status names the round held, so the aggregator stops waiting for this device in it); it always says
        the last round submitted, and `wants_global` names a global this device waits for."""
        self.client.publish(self.topics.status(self.cfg.client_id),
                            self._status(state, error, code, about_round, wants_global).to_json(), qos=QOS,
                            retain=True)

    def _say(self, note: Optional[rules.Note]) -> bool:
        """Log a decision's note (once per process for a keyed one); True if it was logged now."""
        if note is None or (note.key and note.key in self._said):
            return False
        if note.key:
            self._said.add(note.key)
        log.log(LEVELS[note.level], "%s", note.text)
        return True

    def _refused(self, refusal: rules.Refused) -> None:
        if self._say(refusal.note) and refusal.status_error is not None:
            self.publish_status("error", refusal.status_error, refusal.status_code, refusal.about_round)

    def _where(self) -> str:
        """The run and round this agent is in, to key a refusal's note (said once per round)."""
        return f"{self.state.run_id}/{self.round.round if self.round else '-'}"

    # -- sending the update --------------------------------------------------------------------
    def _publish_update(self, round_: int, blob: bytes) -> bool:
        """QoS 1 publish of an update; True once the broker acknowledged it within the timeout.

        On False the message stays in flight: paho keeps it queued and sends it on reconnect, and
        the outbox is marked sent when its acknowledgement comes (`_settle_inflight`). It is never
        published a second time by this process.
        """
        info = self.client.publish(self.topics.update(self.cfg.client_id), blob, qos=QOS)
        self._inflight = InFlight(round_, info.mid)
        deadline = time.monotonic() + self.cfg.publish_timeout_s
        while not self._settle_inflight():
            if time.monotonic() > deadline or self.stop_event.is_set():
                self._inflight.gave_up_waiting = True
                return False
            time.sleep(0.02)
        return True

    def _settle_inflight(self) -> bool:
        """Mark the outbox sent once the broker acknowledged the update in flight; True when none is left."""
        f = self._inflight
        if f is None:
            return True
        acked, reason = self._acks.take(f.mid)
        if not acked:
            return False
        self._inflight = None
        if reason is not None and getattr(reason, "is_failure", False):
            log.error("round %d: the broker refused the update: %s", f.round, reason)
        elif f.gave_up_waiting:
            log.info("round %d: the broker acknowledged the update", f.round)
        if self.state.outbox_round == f.round and not self.state.outbox_sent:
            self.store.mark_sent(self.state)
        return True

    def _resend(self, effect: rules.Resend) -> None:
        """Send the stored update once more: after a restart (not acknowledged), or when the aggregator asks
        (its announcement's `resend`: the update never reached it), once per request."""
        round_ = effect.round
        if effect.attempt:
            self._resent.add((self.state.run_id, round_, effect.attempt))
        else:
            self._resend_pending = False
        blob = self.store.outbox()
        if blob is None:
            log.warning("the update of round %d is recorded but its file is missing: not re-sent", round_)
            return
        why = (f"the aggregator never received it, request {effect.attempt}" if effect.attempt
               else "not acknowledged before a restart")
        log.info("re-sending the stored update of round %d (%s)", round_, why)
        self._publish_update(round_, blob)

    def _start_run(self, change: rules.StartRun) -> None:
        self._say(change.note)
        self.store.start_run(self.state, self.cfg.federation, change.run_id)
        self._resend_pending = False
        self._inflight = None

    # -- message handling (main thread) ------------------------------------------------------
    def handle(self, kind: str, payload: bytes) -> None:
        """Apply one message. What the rules refuse is logged there; anything else one raises (a bug a message
        reached) is logged with its traceback and the message dropped: no payload stops the agent (a state-dir
        OSError still does)."""
        try:
            if kind == "connected":
                self.publish_status("online")
            elif kind == "global":
                self._handle_global(payload)
            elif kind == "round":
                self._handle_round(payload)
            elif kind == "secagg-stage" and self.secure is not None:
                self._secure_step(self.secure.on_stage(payload))
            elif kind == "secagg-inbox" and self.secure is not None:
                self._secure_step(self.secure.on_inbox(payload))
        except OSError:
            raise
        except Exception:
            log.exception("a %s message (%d bytes) could not be handled; it is ignored", kind, len(payload))

    def _handle_global(self, payload: bytes) -> None:
        body = rules.authenticate(payload, "global", self.trust, self._where())
        if isinstance(body, rules.Refused):
            self._refused(body)
            return
        received = rules.read_global(body, self.manifest)
        if isinstance(received, rules.Refused):
            self._refused(received)
            return
        self.global_ = received
        log.info("received the global adapter of round %d (%d bytes)", received.adapter.meta.round, len(payload))

    def _handle_round(self, payload: bytes) -> None:
        body = rules.authenticate(payload, "round", self.trust, self._where())
        if isinstance(body, rules.Refused):
            self._refused(body)
            return
        announcement = rules.read_round(body)
        if isinstance(announcement, rules.Refused):
            if announcement.forget_round:
                self.round = None
            self._refused(announcement)
            return
        jump = rules.check_round_jump(announcement, self.view(), self.cfg.max_round_jump)
        if jump is not None:
            self._refused(jump)
            return
        for effect in rules.enter_round(announcement, self.view()):
            if isinstance(effect, rules.StartRun):
                self._start_run(effect)
                self._highest_announced = None
            else:
                self._resend(effect)
        self.round = announcement
        if self._highest_announced is None or announcement.round > self._highest_announced:
            self._highest_announced = announcement.round
        self._enter_secure(announcement)

    # -- secure aggregation --------------------------------------------------------------------
    def _enter_secure(self, r: RoundAnnouncement) -> None:
        """A secure round starts (or goes on) in the session; any other round ends the one it held."""
        if self.secure is None:
            return
        if not r.secure or not r.asks(self.cfg.client_id):
            self.secure.end()
            return
        try:
            params = SecAggParams.from_json(r.secagg)
        except MessageError as exc:
            self._say(rules.Note(rules.ERROR, f"round {r.round}: unusable secure-aggregation parameters, not "
                                              f"taking part: {exc}", key=f"params-{r.run_id}/{r.round}"))
            self.secure.end()
            return
        self._secure_step(self.secure.begin(r.run_id, r.round, params))

    def _secure_step(self, step: SessionStep) -> None:
        """Carry out what the session says: log, publish its replies, record a given update as submitted."""
        for level, text in step.notes:
            log.log(LEVELS[level], "%s", text)
        for reply in step.replies:
            self.client.publish(self.topics.secagg_up(self.cfg.client_id), reply, qos=QOS)
        if step.given and self.secure is not None and self.secure.round is not None:
            self.store.record_given(self.state, self.secure.round[1])

    def _delta(self, trained: Dict[str, np.ndarray]) -> np.ndarray:
        """The trained adapter minus the round's global, flat in the adapter's layout, float64."""
        assert self.global_ is not None
        start = self.global_.adapter.as_float32()
        return np.concatenate([np.ravel(trained[name]).astype(np.float64) - np.ravel(start[name])
                               for name, _, _, _ in self.layout.entries])

    def maybe_train(self) -> None:
        """Do what the rules say for the round announced now: train it, finish, or wait (saying why once)."""
        action = rules.next_action(self.round, self.view())
        if isinstance(action, rules.Finish):
            self._say(action.note)
            self.done = True
            self.publish_status("idle")
        elif isinstance(action, rules.Idle):
            if self._say(action.note) and action.status_error is not None:
                self.publish_status("error", action.status_error, action.status_code)
            elif action.reason == rules.WAITING_FOR_GLOBAL and self.round is not None and self._say(
                    rules.Note(rules.INFO, f"round {self.round.round}: asking for its global",
                               key=f"ask-{self.round.run_id}/{self.round.round}-{self.view().global_sha256}")):
                # the broker's retained global is lost or stale (a restart without persistence, an old save):
                # say which one this round needs; the aggregator publishes it again
                self.publish_status("online", wants_global=self.round.global_sha256)
        elif self.round is not None:
            self._train_or_fail(self.round)

    def _train_or_fail(self, r: RoundAnnouncement) -> None:
        try:
            self.train(r)
        except Stopped:
            raise
        except Exception as exc:  # a round's failure must not stop the agent (systemd would loop on it)
            self._round_failed(r, exc)

    def _round_failed(self, r: RoundAnnouncement, exc: Exception) -> None:
        """Log, publish a retained `error` status, never retry this round in this process."""
        self._failed.add((r.run_id, r.round))
        failed = fields("round-failed", round=r.round, reason=type(exc).__name__)
        if isinstance(exc, (TrainerError, ImageError)):
            log.error("round %d failed, not submitted: %s", r.round, exc, extra=failed)
        else:
            log.exception("round %d failed, not submitted: %s", r.round, exc, extra=failed)
        self.publish_status("error", f"round {r.round} failed: {type(exc).__name__}: {exc}", ROUND_FAILED)
        if self.metrics is not None:
            self.metrics.record_failure()
        self._recover_trainer()

    def _recover_trainer(self) -> None:
        """Fresh optimizer state after a failed round: a non-finite step may have poisoned AdamW's moments
        (the weights come from the next global)."""
        self.trainer.reset_optimizer()
        log.info("reset the %s trainer's optimizer after the failed round", self.trainer.name)

    def _apply_global(self) -> None:
        """Load the round's global adapter into the live session and persist it as the last applied."""
        g = self.global_
        assert g is not None
        self.trainer.set_adapter(g.adapter.as_float32())  # into the live session
        self.store.record_global(self.state, g.blob, g.adapter.meta.round, g.sha256)

    def train(self, r: RoundAnnouncement) -> None:
        cfg = r.config
        log.info("round %d: training %d epochs, lr %g, batch %d on %d images", r.round, cfg.epochs, cfg.lr,
                 cfg.batch_size, len(self.train_data), extra=fields("training", round=r.round))
        self.publish_status("training")
        if cfg.reset_optimizer:  # the round asks every client to start from zero Adam moments
            self.trainer.reset_optimizer()
        self._apply_global()
        self.trainer.set_lr(cfg.lr)
        if not self.trainer.set_weight_decay(cfg.weight_decay):
            self._say(rules.Note(rules.WARNING, f"round asks weight_decay={cfg.weight_decay:g}, but the "
                                 f"{self.trainer.name} trainer cannot change the {self.trainer.weight_decay:g} the "
                                 "bundle was exported with; using the exported value",
                                 key=f"weight-decay-{cfg.weight_decay}"))
        result = train_round(
            self.trainer, self.train_data, epochs=cfg.epochs, batch_size=cfg.batch_size,
            seed=self.cfg.seed * 100003 + r.round, progress=lambda line: log.info("round %d: %s", r.round, line),
            progress_every_s=self.cfg.progress_every_s, should_stop=self.stop_event.is_set,
        )
        self._straggle(result.wall_time_s)
        val = evaluate(self.trainer, self.val_data, eval_batch_size(self.manifest.input_kind, cfg.batch_size))
        if r.secure:
            self._hand_to_secure(r, result, val)
            return
        blob = adapter_blob.encode(
            self.update_tensors(r), model_id=self.manifest.model_id, round=r.round, kind="update",
            dtype="float16" if self.cfg.fp16_updates else "float32", client_id=self.cfg.client_id,
            num_samples=len(self.train_data),
        )
        self.store.stash_update(self.state, r.round, blob)  # from here on this round counts as submitted
        sent = self._publish_update(r.round, blob)
        self._publish_metrics(r, result, val, len(blob))
        if self.metrics is not None:
            self.metrics.record_round(r.round, step_time_s=result.step_time_s, wall_time_s=result.wall_time_s,
                                      samples=result.samples, peak_rss_mb=result.peak_rss_mb, loss=result.loss,
                                      accuracy=val.accuracy if val else None)
        log.info("round %d: sent update (%d bytes%s): train loss %.4f acc %.3f, val acc %s, %.1f s, "
                 "%.1f ms/step, peak RSS %.0f MiB", r.round, len(blob),
                 "" if sent else ", not acknowledged yet: paho re-sends it on reconnect", result.loss,
                 result.train_accuracy, f"{val.accuracy:.3f}" if val else "n/a", result.wall_time_s,
                 1e3 * result.step_time_s, result.peak_rss_mb, extra=fields("sent", round=r.round))
        self.publish_status("idle")

    def _straggle(self, trained_s: float) -> None:
        """With --slowdown F, wait (F - 1) times the round's training time (a slow device; stop ends it)."""
        if self.cfg.slowdown > 1.0 and self.stop_event.wait((self.cfg.slowdown - 1.0) * trained_s):
            raise Stopped()

    def _hand_to_secure(self, r: RoundAnnouncement, result: RoundResult, val: Optional[Evaluation]) -> None:
        """A secure round's update goes to the session only: never stored in the outbox nor sent in the clear."""
        if self.secure is None:  # next_action never trains such a round
            raise RuntimeError(f"round {r.round} runs secure aggregation and this agent has no identity for it")
        delta = self._delta(self.update_tensors(r, noise=False))
        self._secure_step(self.secure.trained(delta, len(self.train_data), self._noise_share(r, delta.size)))
        masked_bytes = (self.layout.numel + 1) * 8
        self._publish_metrics(r, result, val, masked_bytes)
        log.info("round %d: trained (train loss %.4f, %.1f s); the update waits for a secure-aggregation attempt",
                 r.round, result.loss, result.wall_time_s)
        self.publish_status("idle")

    def _noise_share(self, r: RoundAnnouncement, size: int) -> Optional[np.ndarray]:
        """Distributed DP under secure aggregation: this device's noise share of std `noise_std`, as integers in
        the round encoding's fixed point (2^-frac_bits), within its declared `noise_bound`; None if none is asked."""
        if not r.config.noise_std:
            return None
        if self.secure is None or self.secure.params is None:
            raise ProtocolError(f"round {r.round} asks for a DP noise share outside a secure round: it would be "
                                "sent with only this device's noise")
        enc = self.secure.params.encoding
        try:
            return dp.integer_noise(size, r.config.noise_std, enc.unit, enc.noise_bound, dp.noise_rng())
        except ValueError as exc:
            raise ProtocolError(f"round {r.round}: the secure encoding cannot hold the DP noise share: {exc}") from None

    def update_tensors(self, r: RoundAnnouncement, noise: bool = True) -> Dict[str, np.ndarray]:
        """What this device sends for round `r`: its trained adapter; under differential privacy (the round's
        `clip_norm`, or `--dp-clip`) the round's global plus the delta clipped to that L2 norm, plus its share
        of the noise when the round asks for one (distributed DP; with `noise=False` the caller adds it: a
        secure round adds it in fixed point, before masking). See edge/dp.py."""
        local = self.trainer.get_adapter()
        clip = dp.effective_clip(r.config.clip_norm, self.cfg.dp_clip)
        if clip is None:
            if r.config.noise_std:
                raise ProtocolError("the round asks for a DP noise share without a clip norm: that bounds nothing")
            return local
        assert self.global_ is not None
        out = dp.privatize(local, self.global_.adapter.as_float32(), clip, r.config.noise_std if noise else None)
        log.info("round %d: update delta norm %.4g %s %g%s", r.round, out.norm,
                 "clipped to" if out.was_clipped else "within the DP clip norm", clip,
                 f", noise share of std {out.noise_std:g} added" if out.noise_std else "")
        return out.tensors

    def _publish_metrics(self, r: RoundAnnouncement, result: RoundResult, val: Optional[Evaluation],
                         update_bytes: int) -> None:
        metrics = Metrics(
            client_id=self.cfg.client_id, round=r.round, loss=result.loss,
            accuracy=val.accuracy if val else None, train_accuracy=result.train_accuracy,
            samples=result.samples, steps=result.steps, epochs=result.epochs, wall_time_s=result.wall_time_s,
            step_time_s=result.step_time_s, peak_rss_mb=result.peak_rss_mb, backend=self.trainer.name,
            extra={"val_loss": val.loss if val else None, "images_per_s": result.images_per_s,
                   "update_bytes": update_bytes},
        )
        self.client.publish(self.topics.metrics(self.cfg.client_id), metrics.to_json(), qos=QOS)

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> int:
        log.info("client %s joining federation %r at %s", self.cfg.client_id, self.cfg.federation,
                 self.broker_cfg.describe())
        if self.metrics is not None and self.cfg.metrics_port is not None:
            port = self.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_host)
            log.info("metrics for Prometheus on http://%s:%d/metrics", self.cfg.metrics_host, port)
        if self.trust.required:
            log.info("global and round messages must carry the aggregator's signature")
        else:
            log.info("no aggregator key configured (--aggregator-key, --identity-dir): global and round messages "
                     "are not authenticated")
        self.connection.start(timeout=self.cfg.connect_timeout_s)
        try:
            while not self.stop_event.is_set() and self.pump(timeout=0.5):
                pass
        finally:
            self.shutdown()
        return 0

    def pump(self, timeout: float = 0.0) -> bool:
        """Apply every queued event (waiting up to `timeout` for the first), settle the update in
        flight, train if a round is due; False once the agent should exit."""
        try:
            kind, payload = self.events.get(timeout=timeout) if timeout > 0 else self.events.get_nowait()
            self.handle(kind, payload)
            while True:  # apply everything queued before deciding to train
                self.handle(*self.events.get_nowait())
        except queue.Empty:
            pass
        self._settle_inflight()
        if self.secure is not None:
            self._secure_step(self.secure.tick())
        try:
            self.maybe_train()
        except Stopped:
            log.info("stopped in the middle of a round; it was not submitted")
            return False
        return not (self.done and self.cfg.exit_when_done)

    def shutdown(self) -> None:
        try:
            if self.connection.connected.is_set():
                info = self.client.publish(self.topics.status(self.cfg.client_id), self._status("offline").to_json(),
                                           qos=QOS, retain=True)
                info.wait_for_publish(timeout=5)
        except (RuntimeError, ValueError):
            pass
        self.connection.stop()
        if self.metrics is not None:
            self.metrics.stop()

    def stop(self) -> None:
        self.stop_event.set()
