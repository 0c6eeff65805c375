"""flora-aggregator: runs rounds over MQTT, validates and averages updates, checkpoints, survives restarts.

paho's network thread only queues incoming messages; the main thread validates, folds, closes rounds
and publishes, so no state is shared between threads. Updates are acknowledged manually (paho's
`manual_ack`): the main thread sends the PUBACK only once the update is spooled to disk or its rejection
is saved in the round's record, so a crash before that leaves it unacknowledged and the broker delivers
it again to the restarted aggregator's session. Status and metrics messages are acknowledged at once.
At most `max_queued_updates` updates wait in memory: beyond that paho's thread waits for room, so the
rest stay at the broker (TCP backpressure) and memory stays flat however many updates are pending
(mosquitto 2.0's own in-flight limit lets more through once acks flow). The protocol is docs/protocol.md.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flora.edge import adapter, signing, wire
from flora.edge.bundle import Manifest
from flora.edge.dp import delta_norm
from flora.edge.errors import EXIT_UNAVAILABLE, ConfigError, FloraError
from flora.edge.fileio import sha256_bytes
from flora.edge.logs import fields
from flora.edge.mqtt import BrokerConfig, Connection, from_others, make_client
from flora.edge.protocol import (
    MODE_SYNC,
    QOS,
    ROUND_DONE,
    ROUND_TRAINING,
    Metrics,
    ProtocolError,
    RoundAnnouncement,
    Status,
    Topics,
    TrainConfig,
)

from .accountant import Decision, DPSettings
from .backpressure import Room
from .checkpoint import (
    METRICS,
    REJECTION,
    UPDATE,
    AggregatorState,
    Checkpoint,
    CheckpointError,
    KeepPolicy,
    apply_record,
    resolve_best_metric,
)
from .dashboard.server import Snapshots
from .dashboard.snapshot import FederationInfo
from .enroll import SIGN_AUTO, aggregator_signer
from .fedbuff import BufferConfig
from .influence import OVER_DECLARED, InfluencePolicy, RoundInfluence, changed, decide
from .influence import Decision as Bound
from .privacy import DPPolicy
from .ratelimit import Rate, RateLimiter
from .rounds import CLOSE, EXTEND, GIVE_UP, WAIT, NoRoundUpdates, QuorumError, RoundClock, RoundRecord, Sampling
from .schedule import Plateau, round_lr
from .secure_aggregator import SecureAggregation, check_secure_aggregation
from .secure_round import PLAIN_UPDATE, SecureSettings
from .strategies import DPFedAvg, StrategyFull, make_strategy
from .validation import (
    BAD_CLIENT_ID,
    DEFAULT_MAX_NUM_SAMPLES,
    RATE_LIMITED,
    STRATEGY_FULL,
    Rejected,
    RoundView,
    validate_update,
)
from .watch import Watch

if TYPE_CHECKING:
    from paho.mqtt.client import Client as MqttClient

log = logging.getLogger("flora.aggregator")

#: Status states that count a client as online (and so eligible to be asked); `error` is a connected agent
#: that refused something (e.g. a global adapter) and carries on with the next round.
ONLINE_STATES = ("online", "idle", "training", "error")
METRIC_FIELDS = ("loss", "accuracy", "train_accuracy", "samples", "steps", "epochs", "wall_time_s", "step_time_s",
                 "peak_rss_mb", "backend")

#: on_round_closed(round, new_global_tensors) -> extra fields merged into the round's history row.
RoundHook = Callable[[int, Dict[str, np.ndarray]], Dict[str, Any]]
#: on_start(initial_global_tensors) -> fields stored as the state's `initial_eval` (fresh starts only).
StartHook = Callable[[Dict[str, np.ndarray]], Dict[str, Any]]
#: (mid, qos, connection number) of an update still to be acknowledged to the broker.
AckToken = Tuple[int, int, int]
#: (kind, client, payload, ack token or None) as paho's thread queues it.
Event = Tuple[str, str, bytes, Optional[AckToken]]
KINDS = ("update", "status", "metrics")
#: The queue's kind for a message someone else published on the aggregator's own `global` or `round` topic.
FOREIGN = "foreign"
#: The queue's kind for a client's secure-aggregation message (`secagg/up/<id>`).
SECAGG = "secagg-up"
#: The aggregator re-publishes its own `global` and `round` over a foreign one at most this often.
REPUBLISH_EVERY_S = 5.0
#: Room for an update's topic and MQTT headers besides its payload, in the Maximum Packet Size advertised.
PACKET_OVERHEAD = 4096
#: Received updates held in memory at most, in bytes (besides --max-queued-updates in number).
DEFAULT_MAX_QUEUED_BYTES = 256 << 20
#: Per-client rates: an agent sends one update a round (a few more if asked again), and a few statuses.
DEFAULT_UPDATE_RATE = Rate(1.0, 10.0)
DEFAULT_MESSAGE_RATE = Rate(5.0, 50.0)
#: The queue's kind for "paho reconnected" (the main thread then publishes the global and round again).
RECONNECTED = "reconnected"
#: Devices' requests for the global (a status's wants_global) are answered at most this often.
REPUBLISH_INTERVAL_S = 5.0
#: An asked client whose status says it submitted while its update has not come is asked to send it again
#: after this long, at most RESEND_ATTEMPTS times a round.
RESEND_AFTER_S = 5.0
RESEND_ATTEMPTS = 3
#: The queue's kind for an update whose topic id is outside the id grammar.
BAD_UPDATE = "bad-update"
#: The largest --max-num-samples accepted: every weight a strategy gets is then a finite float64.
MAX_WEIGHT = 10 ** 300
#: Messages handled between two syncs of the journal (the broker keeps at most 20 updates in flight anyway).
MAX_BATCH = 256
#: The open round's snapshot (round.json) is rewritten at most this often while only the journal grows.
SNAPSHOT_EVERY_S = 2.0
JOURNAL_OFFSET = "journal_offset"
PARTIAL_KINDS = ("update", adapter.PARTIAL)
#: state.extra["stopped"]["reason"] of a federation stopped before a round would exceed its DP budget
BUDGET = "privacy-budget"
#: The medians of this many earlier rounds' update norms are kept (state.extra) for a round of one update.
NORM_MEDIANS_KEPT = 10
INFLUENCE_STATE = "influence"
#: What the held-out evaluation (`on_round_closed`) returns that must be finite for a new global to be committed.
EVAL_FIELDS = ("test_loss", "test_accuracy")


@dataclass
class AggregatorConfig:
    manifest: Manifest
    initial_adapter: Dict[str, np.ndarray]
    broker: BrokerConfig
    state_dir: Path
    rounds: int
    federation: str = "default"
    train: TrainConfig = field(default_factory=TrainConfig)
    lr_schedule: str = "constant"  # schedule.LR_SCHEDULES: `train.lr` is the schedule's peak
    #: finish early once the held-out test accuracy (else the mean client validation accuracy) plateaus
    stop_on_plateau: Optional[Plateau] = None
    sampling: Sampling = field(default_factory=Sampling)
    round_timeout_s: float = 300.0
    wait_for_clients: int = 0
    wait_timeout_s: float = 600.0
    metrics_grace_s: float = 1.0
    strategy: str = "fedavg"
    strategy_options: Dict[str, Any] = field(default_factory=dict)  # `--strategy-option KEY=VALUE`
    dp: Optional[DPSettings] = None  # differential privacy (DP-FedAvg, accounted; broker/privacy.py)
    max_update_bytes: Optional[int] = None
    max_num_samples: int = DEFAULT_MAX_NUM_SAMPLES
    max_extensions: int = 0  # 0: extend a round below quorum for as long as it takes
    max_queued_updates: int = 32  # updates received but not yet handled, at most (memory bound)
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES  # ... and at most these many bytes of them
    update_rate: Rate = DEFAULT_UPDATE_RATE  # per client: updates beyond it are counted rate-limited, unread
    message_rate: Rate = DEFAULT_MESSAGE_RATE  # per client: statuses and metrics beyond it are dropped
    on_round_closed: Optional[RoundHook] = None
    on_start: Optional[StartHook] = None
    client_id: str = "flora-aggregator"
    snapshots: Optional[Snapshots] = None  # where live dashboard snapshots go (`--http`), if anywhere
    sites: FrozenSet[str] = frozenset()  # clients that are site aggregators: their updates are partials
    mode: str = MODE_SYNC  # or "async": buffered asynchronous rounds (broker/async_rounds.py)
    buffer: BufferConfig = field(default_factory=BufferConfig)  # async only
    sign: str = SIGN_AUTO  # sign `global` and `round`: auto (when the state dir holds the key), yes, no
    secure_aggregation: bool = False  # every round by secure aggregation (the aggregator sees only the sum)
    secagg: SecureSettings = field(default_factory=SecureSettings)  # its k, t, encoding, timeouts, attempts
    keep_globals: Optional[int] = 1  # the N latest global files are kept; None: all
    keep_best: Optional[str] = None  # also keep the best global by this metric (checkpoint.KEEP_BEST_METRICS)
    #: how much one client may move a round (broker/influence.py): declared num_samples, share cap, norm bound;
    #: None: no bound. Secure aggregation sees no single update (none applies); async applies the declared check.
    influence: Optional[InfluencePolicy] = field(default_factory=InfluencePolicy)


class ClientsAbsent(FloraError, TimeoutError):
    """Fewer clients than --wait-for-clients came online within --wait-timeout."""

    exit_code = EXIT_UNAVAILABLE


def _numpy_to_json(value: Any) -> Any:
    """json.dumps fallback for what hooks tend to return: numpy scalars and arrays."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class Aggregator:
    """One federation: `run()` until the last round is done or `stop()` is called (from any thread).

    `client` is a paho MQTT client (`Aggregator.open` makes one from the config; tests pass a fake); the
    aggregator sets its callbacks and connects it only in `run()`.
    """

    def __init__(self, cfg: AggregatorConfig, client: MqttClient, clock: Callable[[], float] = time.time) -> None:
        if cfg.rounds < 1:
            raise ConfigError(f"--rounds must be >= 1, got {cfg.rounds}")
        self.cfg = cfg
        self.manifest = cfg.manifest
        self.topics = Topics(cfg.federation)
        self.clock = clock
        if not 1 <= cfg.max_num_samples <= MAX_WEIGHT:
            raise ConfigError(f"--max-num-samples must be >= 1 and <= 1e300 (a float64 weight), got "
                             f"{str(cfg.max_num_samples)[:24]}")
        round_lr(cfg.train.lr, cfg.lr_schedule, 0, cfg.rounds)  # an unknown schedule fails here, not mid-run
        self.privacy = DPPolicy(cfg.dp) if cfg.dp is not None else None
        self.rounds = RoundClock(cfg.sampling, cfg.round_timeout_s, clock, cfg.metrics_grace_s, cfg.max_extensions,
                                 grow_on_extend=self.privacy is None)
        self.strategy = self._make_strategy(cfg)
        best = resolve_best_metric(cfg.keep_best, evaluation_configured=cfg.on_round_closed is not None)
        if best == "test_accuracy" and cfg.on_round_closed is None:
            raise ConfigError("--keep-best test_accuracy needs held-out evaluation (--eval-data)")
        self.checkpoint = Checkpoint(cfg.state_dir, KeepPolicy(cfg.keep_globals, best))
        self.max_bytes = cfg.max_update_bytes or adapter.max_blob_bytes(self.manifest.trainable)
        self.max_partial_bytes = adapter.max_blob_bytes(self.manifest.trainable, itemsize=8)
        if cfg.sites and not self.strategy.folds_partials:
            raise ConfigError(f"--sites: the {self.strategy.name} strategy cannot fold a site's partial (its aggregate "
                              "is not a sum); use fedavg")
        if cfg.max_queued_updates < 1:
            raise ConfigError(f"--max-queued-updates must be >= 1, got {cfg.max_queued_updates}")
        self.events: queue.Queue[Event] = queue.Queue()
        self._room = Room(cfg.max_queued_updates, cfg.max_queued_bytes)  # places for updates in `events`
        self._update_rate = RateLimiter(cfg.update_rate)  # used by paho's thread only
        self._message_rate = RateLimiter(cfg.message_rate)
        self.dropped_messages = 0  # metrics over their sender's rate (paho's thread counts)
        # the latest status of a client over its rate, by client (a status is retained state: the last one wins)
        self._held_statuses: Dict[str, bytes] = {}
        self._held_lock = threading.Lock()
        self._logged_rejections: Set[Tuple[int, str, str]] = set()
        self._no_round_dirty = False  # the no-round record changed since it was saved (see _settle)
        self.stop_event = threading.Event()
        self.online: Set[str] = set()
        self.watch = Watch(self.checkpoint, FederationInfo(cfg.federation, "sync", self.strategy.name,
                                                           cfg.sampling.min_clients, cfg.round_timeout_s),
                           cfg.snapshots, clock)
        self.current: Optional[RoundRecord] = None
        self.no_round: Optional[NoRoundUpdates] = None
        self.connections = 0  # (re)connections so far: an ack token is good on its own connection only
        self._snapshot_dirty, self._snapshot_at = False, 0.0  # the open round's journal has grown past round.json
        self._digests: Dict[str, str] = {}  # sha256 of each update accepted in the open round, by client
        self.state: Optional[AggregatorState] = None
        self.global_blob = b""
        self.global_tensors: Dict[str, np.ndarray] = {}
        self.signer: Optional[Ed25519PrivateKey] = None  # loaded from the state dir in run()
        self._signed_topics = {self.topics.global_: "global", self.topics.round: "round"}
        self._retained: Dict[str, bytes] = {}  # topic -> the payload this aggregator last published retained there
        self._guarded = {self.topics.global_, self.topics.round, self.topics.secagg_stage}
        self.secagg: Optional[SecureAggregation] = None
        if cfg.secure_aggregation:
            check_secure_aggregation(self.strategy)
            if cfg.mode != MODE_SYNC or cfg.sites:
                raise ConfigError("--secure-aggregation runs synchronous rounds of devices only: not with --mode "
                                  "async or --sites")
            self.secagg = SecureAggregation(cfg.secagg, self.checkpoint, self.topics, cfg.sampling,
                                            cfg.round_timeout_s, adapter.layout_of(tuple(self.manifest.trainable)),
                                            clock)
        self._republish_at: Dict[str, float] = {}  # topic -> earliest time to put ours back over a foreign one
        self.broker_cfg = cfg.broker
        self.client = client
        self.client.manual_ack_set(True)  # updates are acked after they are durable (see _handle_event)
        self.client.on_message = self._on_message
        # MQTT 5 Maximum Packet Size: the broker does not send the aggregator what no valid update fits in
        largest = max(self.max_bytes, self.max_partial_bytes if cfg.sites else 0)  # a site's partial is float64
        self.connection = Connection(self.broker_cfg, self.client, on_connected=self._on_connected,
                                     max_packet_size=largest + PACKET_OVERHEAD)
        self._republish_why: Optional[str] = None  # why the global and round should go out again
        self._republished_at = -math.inf
        # the share cap and norm bound at a sync round's close: not where the aggregator sees only a sum
        self.influence = cfg.influence if not cfg.secure_aggregation else None
        self._norm_median: Optional[float] = None  # the closing round's median update norm, kept at its commit
        self._influence = RoundInfluence()  # the open round's accepted updates: weight and delta norm each
        self._global_flat = np.zeros(0)  # the open round's global in the adapter layout, float64 (for norms)

    def _make_strategy(self, cfg: AggregatorConfig):
        """The round's strategy: DP-FedAvg under --dp-*, the named one otherwise; ConfigError for what cannot
        combine (DP-FedAvg by name without accounting, DP with async rounds, central DP with secure aggregation,
        distributed DP without it). Per-update strategies under secure aggregation: `check_secure_aggregation`."""
        if self.privacy is None and cfg.strategy == DPFedAvg.name:
            raise ConfigError("--strategy dp-fedavg is set up by the --dp-* options (--dp-clip, "
                              "--dp-noise-multiplier), which also count epsilon and tell the devices to clip")
        if cfg.dp is not None and cfg.mode != MODE_SYNC:
            raise ConfigError("--dp-* needs synchronous rounds (--mode sync): the accountant charges each round's "
                              "sampling of the devices, which buffered asynchronous rounds do not have")
        if cfg.dp is not None and cfg.secure_aggregation and cfg.dp.mode != "distributed":
            raise ConfigError("--dp-* with --secure-aggregation needs --dp-mode distributed: central DP clips each "
                              "update on the aggregator, which secure aggregation hides; distributed DP has every "
                              "device clip and add its share of the noise under the mask (docs/privacy.md)")
        if cfg.dp is not None and cfg.dp.mode == "distributed" and not cfg.secure_aggregation:
            raise ConfigError("--dp-mode distributed needs secure aggregation: without it the aggregator sees each "
                              "update with only its own share of the noise")
        strategy = (self.privacy.strategy(cfg.strategy, cfg.strategy_options) if self.privacy is not None
                    else make_strategy(cfg.strategy, cfg.strategy_options))
        return strategy

    @classmethod
    def open(cls, cfg: AggregatorConfig, clock: Callable[[], float] = time.time) -> Aggregator:
        """The aggregator of `cfg` with a paho client for its broker (not connected yet)."""
        return cls(cfg, make_client(cfg.broker, cfg.client_id), clock)

    # -- MQTT (paho's thread: queue only) ---------------------------------------------------
    def _on_connected(self, client) -> None:
        self.connections += 1
        topics = [(self.topics.all_updates, QOS), (self.topics.all_status, QOS), (self.topics.all_metrics, QOS),
                  (self.topics.global_, from_others(QOS)), (self.topics.round, from_others(QOS))]
        if self.secagg is not None:
            topics += [(self.topics.all_secagg_up, QOS), (self.topics.secagg_stage, from_others(QOS))]
        client.subscribe(topics)
        if self.connections > 1:  # a broker restarted without persistence has lost the retained global and round
            self.events.put((RECONNECTED, "", b"", None))

    def _route(self, topic: str) -> Tuple[Optional[str], str]:
        """(kind, client) of a subscribed topic; kind `bad-update` for an update whose topic id is outside the
        id grammar (counted, not folded); (None, "") for anything else."""
        parts = self.topics.split(topic)
        if parts is not None and parts[0] == "secagg" and self.secagg is not None:
            sub, _, who = parts[1].partition("/")
            return (SECAGG, who) if sub == "up" and self.topics.client_of(f"{self.topics.base}/up/{who}", "up") else (
                None, "")
        if parts is None or parts[0] not in KINDS:
            return None, ""
        kind, who = parts
        if self.topics.client_of(topic, kind) is None:
            return (BAD_UPDATE, wire.short(who, 80)) if kind == "update" else (None, "")
        return kind, who

    def _on_message(self, client, userdata, msg) -> None:
        """Queue the message; acknowledge all but updates at once (an update is acked once it is durable).

        A sender over its rate costs a token-bucket lookup: its update is queued unread, to be counted as
        `rate-limited` (and acked once that count is saved), its status or metrics message dropped."""
        if msg.topic in self._guarded:  # not our own (No Local): someone else wrote our topic
            client.ack(msg.mid, msg.qos)
            self.events.put((FOREIGN, msg.topic, bytes(msg.payload), None))
            return
        kind, who = self._route(msg.topic)
        if kind in ("update", BAD_UPDATE):
            token = (msg.mid, msg.qos, self.connections)
            if not self._update_rate.allow(who if kind == "update" else BAD_UPDATE):  # bad ids share one bucket
                self.events.put((RATE_LIMITED, who, b"", token))
                return
            self._room.take(len(msg.payload), self.stop_event)
            self.events.put((kind, who, bytes(msg.payload), token))
            return
        if kind == SECAGG:  # a masked input is as large as an update: it waits for room too (acked at once: a
            client.ack(msg.mid, msg.qos)  # restart aborts the attempt anyway, nothing of it is kept on disk)
            self._room.take(len(msg.payload), self.stop_event)
            self.events.put((kind, who, bytes(msg.payload), None))
            return
        client.ack(msg.mid, msg.qos)
        if kind is None:
            return
        if not self._message_rate.allow(who):
            if kind == "status":  # its latest status still counts: kept aside, handled at the next batch's end
                with self._held_lock:
                    self._held_statuses[who] = bytes(msg.payload)
            else:
                self.dropped_messages += 1
            return
        if kind == "status" and self._held_statuses:
            with self._held_lock:
                self._held_statuses.pop(who, None)  # superseded by this newer one
        self.events.put((kind, who, bytes(msg.payload), None))

    def _ack(self, token: AckToken) -> None:
        """PUBACK an update (thread-safe: paho queues the packet for its network thread, as for a publish)."""
        mid, qos, connection = token
        if connection != self.connections:  # the broker redelivers it on the new connection (same session)
            log.info("update mid %d came on an earlier connection: not acknowledged, the broker resends it", mid)
            return
        self.client.ack(mid, qos)

    def _publish(self, topic: str, payload: bytes, retain: bool, wait: float = 30.0) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK (paho resends after a reconnect). `global` and
        `round` go out signed when the aggregator has a key (docs/protocol.md, "Signed messages")."""
        purpose = self._signed_topics.get(topic)
        if purpose is not None and self.signer is not None:
            payload = signing.sign(self.signer, purpose, self.cfg.federation, payload)
        if retain:
            self._retained[topic] = payload
        info = self.client.publish(topic, payload, qos=QOS, retain=retain)
        deadline = time.monotonic() + wait
        while True:
            done = _is_published(info)
            if done is None:  # not connected: paho keeps the message and sends it once it has reconnected
                log.info("not connected to the broker: %s goes out when paho reconnects", topic)
                return
            if done or time.monotonic() >= deadline or self.stop_event.is_set():
                break
            self._drain(0.01)  # keep handling messages: paho's thread may be waiting for room in the queue
        if wait > 0 and not done and not self.stop_event.is_set():
            log.warning("no PUBACK for %s within %.0f s; paho will resend it after reconnecting", topic, wait)

    def _publish_all(self, messages, wait: float = 60.0) -> None:
        """Publish (topic, payload, retain) messages at QoS 1, then wait for their PUBACKs together (a stage's
        thousand inbox messages cost one round trip, not a thousand)."""
        infos = []
        for topic, payload, retain in messages:
            if retain:
                self._retained[topic] = payload
            infos.append(self.client.publish(topic, payload, qos=QOS, retain=retain))
        deadline = time.monotonic() + wait
        while (any(_is_published(i) is False for i in infos) and time.monotonic() < deadline  # None: disconnected
               and not self.stop_event.is_set()):
            self._drain(0.01)

    # -- state -------------------------------------------------------------------------------
    def _load_signer(self) -> None:
        self.signer = aggregator_signer(self.checkpoint.dir, self.cfg.federation, self.cfg.sign)
        if self.signer is None and self.secagg is not None:
            raise ConfigError(f"--secure-aggregation needs the federation's keys in {self.checkpoint.dir} (its stage "
                              "messages are signed, devices must be enrolled): `flora-aggregator enroll DEVICE "
                              "--state-dir ...` for each device first, and not --sign no")
        if self.signer is not None:
            log.info("signing global and round with the federation's key in %s (public key %s)",
                     self.checkpoint.dir, signing.public_key_b64(self.signer.public_key()))
        else:
            log.info("global and round are not signed (no aggregator key in %s; --sign yes makes one)",
                     self.checkpoint.dir)

    def _resume_or_start(self) -> None:
        self._load_signer()
        loaded = self.checkpoint.load()
        if loaded is None:
            blob = adapter.encode(self.cfg.initial_adapter, model_id=self.manifest.model_id, round=0, kind="global")
            self.state = self.checkpoint.start(self.manifest.model_id, self.cfg.rounds, blob)
            self.state.strategy = self.strategy.name
            self.checkpoint.save(self.state)
            log.info("fresh state dir %s: run id %s", self.checkpoint.dir, self.state.run_id)
            if self.cfg.on_start is not None:
                self.state.extra["initial_eval"] = self._call_hook("on_start", self.cfg.on_start,
                                                                   adapter.decode(blob).as_float32())
                self.checkpoint.note_initial(self.state, self.state.extra["initial_eval"])
            log.info("starting federation %r: %d rounds of %s, model %s…", self.cfg.federation, self.cfg.rounds,
                     self.strategy.name, self.manifest.model_id[:16])
        else:
            self.state, blob = loaded
            if self.state.model_id != self.manifest.model_id:
                raise CheckpointError(
                    f"state dir {self.checkpoint.dir} belongs to model {self.state.model_id[:16]}…, the bundle is "
                    f"{self.manifest.model_id[:16]}…: use another --state-dir"
                )
            if self.state.strategy and self.state.strategy != self.strategy.name:
                raise CheckpointError(
                    f"state dir {self.checkpoint.dir} was run with --strategy {self.state.strategy}, not "
                    f"{self.strategy.name}: resume it with that strategy or use another --state-dir"
                )
            try:
                self.strategy.load_state_dict(self.checkpoint.strategy_state(self.state))
            except ValueError as exc:
                raise CheckpointError(f"state dir {self.checkpoint.dir}: {exc}") from exc
            if self.state.rounds_total != self.cfg.rounds:
                log.info("total rounds changed from %d to %d", self.state.rounds_total, self.cfg.rounds)
                self.state.rounds_total = self.cfg.rounds
                self.state.done = self.state.round >= self.cfg.rounds
                self.checkpoint.save(self.state)
            log.info("resuming federation %r (run %s) at round %d of %d from %s", self.cfg.federation,
                     self.state.run_id or "-", self.state.round, self.state.rounds_total, self.checkpoint.dir)
        try:
            decoded = adapter.decode(blob, self.manifest.trainable, model_id=self.manifest.model_id)
        except adapter.AdapterError as exc:
            raise CheckpointError(f"the checkpointed global in {self.checkpoint.dir} does not fit the bundle: "
                                  f"{exc}") from exc
        if decoded.meta.round != self.state.round:
            raise CheckpointError(f"the checkpointed global is for round {decoded.meta.round}, the state says "
                                  f"{self.state.round}")
        self.global_blob = blob
        self.global_tensors = decoded.as_float32()
        self._resume_privacy()
        if self.state.extra.get("federation") != self.watch.info.to_json():  # what `dashboard --state-dir` shows
            self.state.extra["federation"] = self.watch.info.to_json()
            self.checkpoint.save(self.state)
        self.watch.load()
        if not self.state.done:
            self._restore_open_round()

    def _resume_privacy(self) -> None:
        """DP: count the rounds already run (from the history); a federation stopped at its budget is looked at
        again (the budget may have been raised: the next round's check decides)."""
        assert self.state is not None
        stopped = self.state.extra.get("stopped")
        if self.privacy is None:
            return
        self.privacy.resume(self.checkpoint.history())
        if isinstance(stopped, dict) and stopped.get("reason") == BUDGET and self.state.round < self.state.rounds_total:
            self.state.done = False
            del self.state.extra["stopped"]
            self.checkpoint.save(self.state)
        log.info("differential privacy: %s; epsilon %.4g at delta %g after %d round(s)%s", self.privacy.settings.mode,
                 self.privacy.ledger.epsilon, self.privacy.settings.delta, len(self.privacy.ledger.events),
                 f", budget {self.privacy.settings.max_epsilon:g}" if self.privacy.settings.max_epsilon else "")

    def _restore_open_round(self) -> None:
        """Resume the round open before a restart, or reload the no-round updates counted for the next one."""
        number = self.state.round
        saved = self.checkpoint.load_open_round(number)
        if saved is not None:
            self.checkpoint.clear_no_round(number)  # a crash after they were merged into the saved record
            offset = int(saved.pop(JOURNAL_OFFSET, 0) or 0)
            self._restore_round(RoundRecord.from_json(saved), offset)
            return
        pending = self.checkpoint.load_no_round(number)
        self.no_round = NoRoundUpdates.from_json(pending) if pending is not None else None

    # -- rounds ------------------------------------------------------------------------------
    def round_config(self, round_: int) -> TrainConfig:
        """What round `round_` asks of its clients: the configured one, at the schedule's learning rate."""
        assert self.state is not None
        lr = round_lr(self.cfg.train.lr, self.cfg.lr_schedule, round_, self.state.rounds_total)
        return replace(self.cfg.train, lr=lr)

    def _dp_round_size(self, rec: RoundRecord) -> int:
        """The n of a DP round's noise shares: the clients it asked; in a secure round its first attempt's (a
        retry asks at most as many, so its m survivors are at most n and carry z*C*sqrt(m/n) of noise)."""
        return self.secagg.size if self.secagg is not None and self.secagg.round is not None else len(rec.asked)

    def _announcement(self, state: str, rec: Optional[RoundRecord]) -> RoundAnnouncement:
        secure = self.secagg.announcement_fields() if self.secagg is not None and rec is not None else {}
        config = self.round_config(self.state.round)
        if self.privacy is not None and rec is not None:  # the clip norm (and noise share) the devices apply
            config = self.privacy.train_config(config, self._dp_round_size(rec))
        return RoundAnnouncement(
            round=self.state.round, model_id=self.manifest.model_id, state=state,
            config=config,
            clients=sorted(rec.asked) if rec is not None else [], resend=dict(rec.resend) if rec is not None else {},
            deadline=rec.deadline if rec is not None else self.clock(),
            global_sha256=sha256_bytes(self.global_blob), total_rounds=self.state.rounds_total,
            run_id=self.state.run_id, **secure,
        )

    def _announce(self, rec: RoundRecord, with_global: bool = True) -> None:
        """Publish the round (retained), after the global it trains from unless that was just published: a
        broker that lost or restored an old retained global never leaves a round without its global."""
        if with_global:
            self._publish(self.topics.global_, self.global_blob, retain=True)
        self._publish(self.topics.round, self._announcement(ROUND_TRAINING, rec).to_json(), retain=True)

    def _announce_done(self, with_global: bool = False) -> None:
        if with_global:
            self._publish(self.topics.global_, self.global_blob, retain=True)
        self._publish(self.topics.round, self._announcement(ROUND_DONE, None).to_json(), retain=True)

    def _want_republish(self, why: str, now: bool = False) -> None:
        """Ask the main loop to publish the global and the announcement again (`now`: not rate-limited)."""
        self._republish_why = why
        if now:
            self._republished_at = -math.inf

    def _maybe_republish(self) -> None:
        """Publish the current global and announcement again when asked to, at most once per
        REPUBLISH_INTERVAL_S for devices' requests (a reconnect to the broker goes at once)."""
        if self._republish_why is None or time.monotonic() - self._republished_at < REPUBLISH_INTERVAL_S:
            return
        why, self._republish_why, self._republished_at = self._republish_why, None, time.monotonic()
        log.info("publishing the round-%d global and announcement again: %s", self.state.round, why)
        if self.current is not None:
            self._announce(self.current)
        elif self.state.done:
            self._announce_done(with_global=True)
        else:
            self._publish(self.topics.global_, self.global_blob, retain=True)

    def _begin(self, rec: RoundRecord, journal_offset: int = 0) -> None:
        """Start folding `rec`; after a restart, replay its journal: every update re-folded in arrival order,
        the rejections and metrics the snapshot (`rec`, saved at `journal_offset`) does not hold yet."""
        self.current = rec
        self.strategy.begin_round(self.manifest.trainable, self.global_tensors)
        self.strategy.set_round_size(len(rec.asked))
        self._digests = {}
        self._influence = RoundInfluence()
        layout = adapter.layout_of(tuple(self.manifest.trainable))
        self._global_flat = np.zeros(layout.numel)
        for name, _, a, b in layout.entries:
            self._global_flat[a:b] = np.ravel(self.global_tensors[name])
        restored = 0
        for entry in self.checkpoint.journaled(rec.number):
            if entry.kind == UPDATE:  # accepted before a restart
                rec.asked.add(entry.key)  # it was asked when its update was accepted
                if self._fold(entry.key, entry.payload, spool=False):
                    restored += 1
                else:  # no longer valid (e.g. a lower --max-num-samples): counted once, never re-folded
                    self.checkpoint.unspool(rec.number, entry.key)
            elif entry.offset >= journal_offset:
                apply_record(rec, entry)
        self._save_round(rec)
        if restored:
            log.info("round %d: %d update(s) restored from the spool", rec.number, restored)

    def _save_round(self, rec: RoundRecord) -> None:
        """Snapshot the open round's record with the journal it includes (made durable first)."""
        self.checkpoint.sync()
        record = rec.to_json()
        record[JOURNAL_OFFSET] = self.checkpoint.journal_end(rec.number)
        self.checkpoint.save_open_round(rec.number, record)
        self._snapshot_dirty, self._snapshot_at = False, time.monotonic()

    def _journal(self, rec: RoundRecord, kind: int, client: str, data: Dict[str, Any]) -> None:
        """Append a rejection or metrics message to the open round's journal (durable at the batch's sync)."""
        self.checkpoint.record(rec.number, kind, client, data)
        self._snapshot_dirty = True

    def _participants(self) -> Set[str]:
        """Online clients that can be asked: in a secure federation, the enrolled ones only."""
        return self.secagg.eligible(self.online) if self.secagg is not None else self.online

    def _open_round(self) -> None:
        if self.secagg is not None:
            self.secagg.load_registry()
        rec = self.rounds.open(self.state.round, self._participants(), self.watch.errors)
        if self.privacy is not None:
            decision = self.privacy.plan(len(rec.asked), rec.population, self.rounds.min_clients)
            if not decision.allowed:
                self._stop_at_budget(rec.number, decision)
                return
            log.info("round %d: differential privacy: %s", rec.number, decision.reason)
        if self.no_round is not None and self.no_round.round == rec.number:
            self.no_round.merge_into(rec)
            log.info("round %d: counts %d update(s) that came while no round was open", rec.number,
                     self.no_round.total)
        self._begin(rec)
        self.checkpoint.clear_no_round(rec.number)  # after round.json holds them
        self.no_round = None
        if self.secagg is not None:
            noise = (self.privacy.noise_share(len(rec.asked)) or 0.0) if self.privacy is not None else None
            self.secagg.open(rec, self.state.run_id, self.signer, noise_std=noise)
        self._announce(rec, with_global=False)  # published at the start or by the commit that made it
        if self.secagg is not None:
            self._publish_all(self.secagg.start_first(rec))
        log.info("round %d of %d open: asked %d client(s) (%s) %s, deadline in %.0f s", rec.number,
                 self.state.rounds_total, len(rec.asked), self.cfg.sampling.describe, sorted(rec.asked),
                 self.cfg.round_timeout_s, extra=fields("round-open", round=rec.number))

    def _stop_at_budget(self, number: int, decision: Decision) -> None:
        """The next round would take epsilon over --dp-max-epsilon: the federation is done here (the state says
        why; a restart with a larger budget goes on)."""
        assert self.state is not None
        log.warning("differential privacy budget: not opening round %d: %s; the federation stops here", number,
                    decision.reason)
        self.state.done = True
        self.state.extra["stopped"] = {"reason": BUDGET, "round": number, "detail": decision.reason,
                                       "epsilon": decision.epsilon, "epsilon_next": decision.epsilon_next}
        self.checkpoint.save(self.state)

    def _restore_round(self, saved: RoundRecord, journal_offset: int = 0) -> None:
        saved.reported, saved.bytes_received, saved.complete_since = {}, 0, None  # rebuilt from the journal
        rec = self.rounds.resume(saved)
        self._begin(rec, journal_offset)
        if self.secagg is not None:
            self.secagg.restore(rec, self.state.run_id, self.signer)
            if self.privacy is not None:  # the noise shares were sized for the round's first attempt
                self.strategy.set_round_size(self.secagg.size)
        log.info("round %d resumed: asked %s, %d reported, deadline in %.0f s", rec.number, sorted(rec.asked),
                 len(rec.reported), self.cfg.round_timeout_s)

    def _fold(self, client: str, blob: bytes, spool: bool = True) -> bool:
        """Validate one update, fold it into the running average and spool it (durably, unless re-folding
        the spool); False if it was rejected (and, when live, the rejection saved in the round's record)."""
        rec = self.current
        assert rec is not None
        view = RoundView(rec.number, rec.asked, rec.reported.keys())
        site = client in self.cfg.sites  # a site aggregator's partial (the weighted sum of its devices' updates)
        try:
            update = validate_update(blob, client, self.manifest, view, self.max_partial_bytes if site else
                                     self.max_bytes, self.cfg.max_num_samples, kinds=PARTIAL_KINDS if site else
                                     ("update",))
        except Rejected as why:
            if why.reason == "duplicate" and self._redelivered(client, blob):
                return False
            return self._reject(rec, client, why.reason, why.detail, len(blob), save=spool)
        num_samples = int(update.meta.num_samples or 0)
        partial = update.meta.kind == adapter.PARTIAL
        # checked when it arrived: a replay after a restart must not judge it again against an older devices.json
        over = None if partial or not spool else self._over_declared(client, num_samples)
        if over is not None:
            return self._reject(rec, client, OVER_DECLARED, over, len(blob), save=spool)
        try:
            if partial:  # folded as it is: the root's sums become the flat ones
                self.strategy.accumulate_partial(update.tensors, num_samples)
            else:
                self.strategy.accumulate(update.tensors, num_samples)  # checks the weight before touching a sum
        except StrategyFull as exc:  # a strategy that keeps every update holds as many as it may
            return self._reject(rec, client, STRATEGY_FULL, str(exc), len(blob), save=spool)
        except ValueError as exc:  # the strategy refused the weight: the sums are untouched
            return self._reject(rec, client, "bad-num-samples", str(exc), len(blob), save=spool)
        if spool:
            self.checkpoint.spool(rec.number, client, blob)  # an OSError here is fatal: nothing is acked
        self._digests[client] = sha256_bytes(blob)
        rec.accept(client, num_samples, len(blob))
        if self.influence is not None and not partial:  # a site's partial is a sum: neither a delta nor one client
            self._influence.add(client, num_samples, self._delta_norm(update.tensors))
        log.info("round %d: accepted update from %s (%d samples, %d bytes, %s); %d of %d asked reported", rec.number,
                 client, num_samples, len(blob), update.meta.dtype, len(rec.reported), len(rec.asked),
                 extra=fields("accepted", round=rec.number, client=client))
        return True

    def _over_declared(self, client: str, num_samples: int) -> Optional[str]:
        """Why an update's num_samples is refused against the device's declared one (its latest status), or None."""
        if self.cfg.influence is None:
            return None
        device = self.watch.devices.get(client)
        return self.cfg.influence.over_declared(num_samples, device.num_samples if device is not None else None)

    def _delta_norm(self, tensors: Any) -> float:
        """L2 norm of an update's distance from the open round's global, in float64."""
        if isinstance(tensors, adapter.FlatTensors) and tensors.flat.size == self._global_flat.size:
            d = tensors.flat.astype(np.float64) - self._global_flat
            return float(np.sqrt(np.dot(d, d)))
        return delta_norm(tensors, self.global_tensors)

    def _bound_influence(self, rec: RoundRecord) -> Dict[str, Any]:
        """Apply the share cap and the norm bound to the open round (`decide`); when they change anything, fold
        the round again from its journal, one update at a time (memory stays flat), with the capped weights and
        clipped deltas, leaving refused updates out (counted as rejections). What changed, for the history row."""
        if self.influence is None or not self._influence.weights:
            return {}
        decisions = decide(self.influence, self._influence, self._earlier_medians())
        kept = [self._influence.norms[c] for c, d in decisions.items() if d.refused is None]
        self._norm_median = float(np.median(kept)) if kept else None
        if not changed(decisions, self._influence.weights):
            return {}
        self.strategy.begin_round(self.manifest.trainable, self.global_tensors)
        self.strategy.set_round_size(len(rec.asked))
        for client, blob in self.checkpoint.spooled(rec.number):
            self._refold(rec, client, blob, decisions.get(client))
        info: Dict[str, Any] = {
            "capped": {c: d.weight for c, d in sorted(decisions.items())
                       if d.refused is None and d.weight != self._influence.weights[c]},
            "clipped": {c: d.scale for c, d in sorted(decisions.items()) if d.refused is None and d.scale != 1.0},
            "refused": {c: d.refused for c, d in sorted(decisions.items()) if d.refused is not None},
        }
        log.warning("round %d: influence bounds applied: %s", rec.number, info,
                    extra=fields("influence", round=rec.number, reason="influence"))
        return info

    def _refold(self, rec: RoundRecord, client: str, blob: bytes, decision: Optional[Bound]) -> None:
        """Fold one journaled update again as `decision` says (as it came when the policy did not see it)."""
        if decision is not None and decision.refused is not None:
            rec.reported.pop(client, None)
            rec.bytes_received -= len(blob)
            rec.reject(client, decision.refused, decision.detail, len(blob))
            log.warning("round %d: rejected update from %s at the close: %s: %s", rec.number, client,
                        decision.refused, decision.detail,
                        extra=fields("rejected", round=rec.number, client=client, reason=decision.refused))
            return
        update = adapter.decode(blob, self.manifest.trainable, model_id=self.manifest.model_id)
        if update.meta.kind == adapter.PARTIAL:
            self.strategy.accumulate_partial(update.tensors, int(update.meta.num_samples or 0))
            return
        tensors = update.as_float32()
        if decision is None:
            self.strategy.accumulate(tensors, int(update.meta.num_samples or 0))
            return
        if decision.scale != 1.0:
            tensors = {k: (self.global_tensors[k].astype(np.float64) + decision.scale *
                           (v.astype(np.float64) - self.global_tensors[k])).astype(np.float32)
                       for k, v in tensors.items()}
        self.strategy.accumulate(tensors, max(1, round(decision.weight)))

    def _earlier_medians(self) -> List[float]:
        """The update-norm medians of the last committed rounds (for a round of one update)."""
        saved = (self.state.extra.get(INFLUENCE_STATE) or {}).get("norm_medians") if self.state else None
        return [float(m) for m in saved or [] if isinstance(m, (int, float)) and math.isfinite(m)]

    def _note_norm_median(self) -> None:
        """Keep the closing round's median update norm (state.extra, saved with the commit)."""
        median, self._norm_median = self._norm_median, None
        if median is None or not math.isfinite(median) or self.state is None:
            return
        medians = [*self._earlier_medians(), median][-NORM_MEDIANS_KEPT:]
        self.state.extra[INFLUENCE_STATE] = {"norm_medians": medians}

    def _redelivered(self, key: str, blob: bytes) -> bool:
        """The very update accepted before (same bytes): the broker's redelivery of a message whose PUBACK a crash
        or a dropped connection lost. Acknowledged again, counted neither as an update nor as a rejection."""
        if self._digests.get(key) != sha256_bytes(blob):
            return False
        log.info("round %d: the update of %s came again (a redelivery): acknowledged, not counted again",
                 self.current.number if self.current is not None else -1, key)
        return True

    def _reject(self, rec: RoundRecord, client: str, reason: str, detail: str, size: int, save: bool,
                quiet: bool = False) -> bool:
        """Count a rejection in the round's record (saved before the update is acked); always False. `quiet`:
        logged once per (round, client, reason), for what a flood repeats."""
        rec.reject(client, reason, detail, size)
        key = (rec.number, client, reason)
        if not quiet or key not in self._logged_rejections:
            if quiet and len(self._logged_rejections) < 100_000:
                self._logged_rejections.add(key)
            log.warning("round %d: rejected update from %s: %s: %s%s", rec.number, client, reason, detail,
                        " (more of these are counted, not logged)" if quiet else "",
                        extra=fields("rejected", round=rec.number, client=client, reason=reason))
        if save:
            self._journal(rec, REJECTION, client, {"reason": reason, "detail": detail, "size": size})
        return False

    def _no_round_record(self) -> NoRoundUpdates:
        """The record of updates counted while no round is open, for the next round to open."""
        assert self.state is not None
        if self.no_round is None or self.no_round.round != self.state.round:
            self.no_round = NoRoundUpdates(self.state.round)
        return self.no_round

    def _count_no_round(self, client: str, blob: bytes) -> None:
        """An update while no round is open: counted as `no-round` in the next round's record (saved)."""
        record = self._no_round_record()
        number = record.round
        detail = f"no round was open (the next is round {number}); the update says round {_claimed_round(blob)}"
        record.add(client, detail, len(blob))
        self._no_round_dirty = True
        log.warning("update from %s while no round is open: not folded, counted as no-round in round %d", client,
                    number, extra=fields("rejected", round=number, client=client, reason="no-round"))

    def _close_round(self) -> None:
        rec = self.current
        assert rec is not None and self.state is not None
        t0 = time.perf_counter()
        influence = self._bound_influence(rec)
        try:
            new = self.strategy.finalize()
        except ValueError as exc:
            self._fail_round(rec, f"the {self.strategy.name} aggregate cannot be computed: {exc}", influence)
            return
        if new is None and influence.get("refused"):
            self._fail_round(rec, "every update was refused by the influence bounds", influence)
            return
        if new is None:  # cannot happen: a round closes with at least min_clients >= 1 updates
            raise RuntimeError(f"round {rec.number} closed without updates")
        bad = adapter.find_non_finite(new)
        if bad is not None:
            self._fail_round(rec, f"the {self.strategy.name} aggregate of tensor {bad} is not finite", influence)
            return
        aggregation_s = time.perf_counter() - t0  # finalize and check, not the evaluation hook nor the commit
        row = self._history_row(rec, new)
        if influence:
            row["influence"] = influence
        why = non_finite_evaluation(row)
        if why is not None:  # rolled back: the previous global stays, the round is recorded failed
            self._fail_round(rec, why, influence, row)
            return
        self.strategy.commit()  # its state across rounds moves on with the accepted global
        row["aggregation_s"] = round(aggregation_s, 6)
        self._note_norm_median()
        self._commit(rec, new, row)
        log.info("round %d closed: %d update(s), %d sample(s), %d rejected%s, %.1f s%s; global for round %d published",
                 rec.number, len(rec.reported), row["samples"], rec.num_rejected,
                 f" {row['rejection_counts']}" if rec.num_rejected else "", row["wall_time_s"],
                 f", test accuracy {row['test_accuracy']:.4f}" if isinstance(row.get("test_accuracy"), float) else "",
                 rec.number + 1, extra=fields("round-closed", round=rec.number))

    def _fail_round(self, rec: RoundRecord, why: str, influence: Optional[Dict[str, Any]] = None,
                    row: Optional[Dict[str, Any]] = None) -> None:
        """A round whose aggregate is unusable: never committed nor published; the round is recorded as
        failed (its updates discarded; `row`: the rolled-back global's row, its evaluation kept) and the next
        round starts from the unchanged global."""
        log.error("round %d FAILED: %s; its %d update(s) are discarded, round %d starts from the round-%d global",
                  rec.number, why, len(rec.reported), rec.number + 1, rec.number,
                  extra=fields("round-failed", round=rec.number, reason=why[:100]))
        row = self._history_row(rec, None) if row is None else row
        row["failed"] = why
        if influence:
            row["influence"] = influence
        self._norm_median = None
        self._commit(rec, self.global_tensors, row)

    def _commit(self, rec: RoundRecord, tensors: Dict[str, np.ndarray], row: Dict[str, Any]) -> None:
        """Checkpoint `tensors` as the global of the next round, then publish it."""
        assert self.state is not None
        next_round = rec.number + 1
        blob = adapter.encode(tensors, model_id=self.manifest.model_id, round=next_round, kind="global")
        done = next_round >= self.state.rounds_total
        if not done and self._plateaued(row):
            row["stopped"] = "plateau"
            log.info("round %d: %s plateaued (%s): finishing the federation early", rec.number,
                     self._plateau_metric(row), self.cfg.stop_on_plateau)
            done = True
        self.state = self.checkpoint.commit(self.state, next_round, blob, row, done,
                                            strategy_state=self.strategy.state_dict())
        self.global_blob, self.global_tensors = blob, tensors
        self.current = None
        self.watch.round_closed(row)
        if self.secagg is not None:
            self._publish_all(self.secagg.closed())
        self._publish(self.topics.global_, blob, retain=True)

    @staticmethod
    def _plateau_metric(row: Dict[str, Any]) -> str:
        return "test_accuracy" if row.get("test_accuracy") is not None else "mean_client_accuracy"

    def _plateaued(self, row: Dict[str, Any]) -> bool:
        """--stop-on-plateau: whether the curve up to and including `row` has plateaued."""
        rule = self.cfg.stop_on_plateau
        if rule is None or row.get("failed"):
            return False
        key = self._plateau_metric(row)
        rows = [*self.checkpoint.history(), row]
        return rule.reached([r.get(key) if not r.get("failed") else None for r in rows])

    def _history_row(self, rec: RoundRecord, new: Optional[Dict[str, np.ndarray]]) -> Dict[str, Any]:
        """The round's history row; the `on_round_closed` hook runs only for a new global (`new`)."""
        accs = [m["accuracy"] for m in rec.metrics.values() if isinstance(m.get("accuracy"), (int, float))]
        losses = [m["loss"] for m in rec.metrics.values() if isinstance(m.get("loss"), (int, float))]
        now = self.clock()
        row: Dict[str, Any] = {
            "round": rec.number,
            "strategy": self.strategy.name,
            "lr": self.round_config(rec.number).lr,
            "asked": sorted(rec.asked),
            "reported": dict(sorted(rec.reported.items())),
            "num_asked": len(rec.asked),
            "num_reported": len(rec.reported),
            "num_rejected": rec.num_rejected,
            "samples": int(sum(rec.reported.values())),
            "rejected": rec.rejected,
            "rejection_counts": dict(sorted(rec.rejection_counts.items())),
            "bytes_received": rec.bytes_received,
            "bytes_rejected": rec.bytes_rejected,
            "global_bytes": len(self.global_blob),
            "bytes_sent": len(self.global_blob) * len(rec.asked),
            "extensions": rec.extensions,
            "started_at": rec.started_at,
            "closed_at": now,
            "wall_time_s": round(now - rec.started_at, 3),
            "metrics": dict(sorted(rec.metrics.items())),
            "mean_client_accuracy": float(np.mean(accs)) if accs else None,
            "mean_client_loss": float(np.mean(losses)) if losses else None,
        }
        if self.secagg is not None:
            row.update(self.secagg.row())  # its attempts and survivors, and `samples`: the sum's total weight
        if new is not None:
            row.update(self.strategy.round_info())  # e.g. {"clipped": 2}, {"dp": {...}}
        if self.privacy is not None:  # charged failed or not: the noise was drawn
            population = max(rec.population, len(rec.asked))
            row["dp"] = {**row.get("dp", {}), **self.privacy.charge(len(rec.asked), population, self.strategy,
                                                                     rec.reported)}
        if self.cfg.on_round_closed is not None and new is not None:
            row.update(self._call_hook(f"round {rec.number}: on_round_closed", self.cfg.on_round_closed,
                                       rec.number, new))
        return row

    @staticmethod
    def _call_hook(what: str, hook: Callable[..., Any], *args: Any) -> Dict[str, Any]:
        """A hook's dict as plain JSON (numpy values converted); a failing hook is logged, never fatal."""
        try:
            return json.loads(json.dumps(dict(hook(*args) or {}), default=_numpy_to_json))
        except Exception as exc:
            log.exception("%s hook failed", what)
            return {"hook_error": f"{type(exc).__name__}: {exc}"}

    # -- events ------------------------------------------------------------------------------
    def handle(self, kind: str, client: str, payload: bytes) -> None:
        """Process one message (main thread) and make its outcome durable; a malformed message is logged and
        dropped. (The event loop dispatches a batch of messages, then saves once: `_drain`.)"""
        self._dispatch(kind, client, payload)
        self._settle([])
        self.checkpoint.sync()

    def _dispatch(self, kind: str, client: str, payload: bytes) -> None:
        if kind == "update":
            if self.current is None:
                self._count_no_round(client, payload)
            elif self.secagg is not None and self.secagg.round is not None:  # never read: a plain update here
                self._reject(self.current, client, PLAIN_UPDATE, f"round {self.current.number} runs secure "
                             "aggregation: a plain update is not read, spooled or folded", len(payload), save=True)
            else:
                self._fold(client, payload)
        elif kind == SECAGG:
            if self.secagg is not None:
                self.secagg.handle(client, payload)
        elif kind == BAD_UPDATE:
            self._count_bad_topic(client, payload)
        elif kind == RATE_LIMITED:
            self._count_rate_limited(client)
        elif kind == RECONNECTED:
            self._want_republish("reconnected to the broker (a restarted broker may have lost them)", now=True)
        elif kind == "status":
            self._handle_status(client, payload)
        elif kind == "metrics":
            self._handle_metrics(client, payload)
        elif kind == FOREIGN:
            self._answer_foreign(client, payload)

    def _answer_foreign(self, topic: str, payload: bytes) -> None:
        """Someone else published on our `global` or `round` topic (an open broker, a second aggregator): agents
        that trust our key refuse it, but a retained one would hide ours from agents that connect later, so
        ours goes back (at most every REPUBLISH_EVERY_S)."""
        ours = self._retained.get(topic)
        if ours is None or payload == ours:  # nothing of ours yet, or the retained copy of ours
            return
        now = time.monotonic()
        if now < self._republish_at.get(topic, 0.0):
            return
        self._republish_at[topic] = now + REPUBLISH_EVERY_S
        log.warning("a message (%d bytes) not from this aggregator was published on %s: publishing ours again",
                    len(payload), topic, extra=fields("foreign-message", reason="foreign"))
        self.client.publish(topic, ours, qos=QOS, retain=True)  # not waited for: paho resends it after a reconnect

    def _count_rate_limited(self, client: str) -> None:
        """An update over its sender's rate (`--rate-limit`), unread: counted `rate-limited` in the open round
        (or the next one's no-round record); it says nothing of the sender's real update, which the round
        still waits for (and asks again for, should the status say it was sent)."""
        detail = f"over the per-client rate of {self.cfg.update_rate.describe()} (--rate-limit)"
        if self.current is not None:
            self._reject(self.current, client, RATE_LIMITED, detail, 0, save=True, quiet=True)
            return
        self._no_round_record().add(client, detail, 0, RATE_LIMITED)
        self._no_round_dirty = True

    def _count_bad_topic(self, topic_id: str, payload: bytes) -> None:
        """An update on `update/<id>` with an id outside the grammar: counted as `bad-client-id` in the open
        round's record (or the next round's, while none is open), never folded."""
        detail = f"topic id {topic_id} is not 1-64 letters, digits, '_', '-' or '.'"
        if self.current is not None:
            self._reject(self.current, topic_id, BAD_CLIENT_ID, detail, len(payload), save=True)
            return
        self._no_round_record().add(topic_id, detail, len(payload), BAD_CLIENT_ID)
        self._no_round_dirty = True

    def _handle_status(self, client: str, payload: bytes) -> None:
        if not payload:  # a cleared retained status: the client is gone
            self.online.discard(client)
            self.watch.status(client, None)
            return
        try:
            status = Status.from_json(payload)
        except ProtocolError as exc:
            log.warning("ignored a malformed status from %s: %s", client, exc)
            return
        was_online = client in self.online
        if status.state in ONLINE_STATES and status.client_id == client:
            self.online.add(client)
        else:
            self.online.discard(client)
        if status.client_id == client:
            self.watch.status(client, status)
        if was_online != (client in self.online):
            log.info("client %s is %s (%d online)", client, status.state, len(self.online),
                     extra=fields("client-state", client=client, reason=status.state))
        if status.client_id != client:
            return
        if status.wants_global is not None and status.wants_global == sha256_bytes(self.global_blob):
            self._want_republish(f"{client} waits for it (the broker's retained copy is lost or stale)")
        rec = self.current
        # (a sync round only: an async buffer asks no one and waits for no one in particular)
        if isinstance(rec, RoundRecord) and rec.submitted(client, status.submitted, self.clock()):
            log.info("round %d: %s says it submitted, but its update has not come", rec.number, client)

    def _handle_metrics(self, client: str, payload: bytes) -> None:
        try:
            metrics = Metrics.from_json(payload)
        except ProtocolError as exc:
            log.warning("ignored malformed metrics from %s: %s", client, exc)
            return
        if metrics.client_id != client:
            log.debug("metrics from %s that name client %s: ignored", client, metrics.client_id)
            return
        self.watch.metrics(client, metrics)
        rec = self.current
        secure_asked = self.secagg is not None and rec is not None and client in rec.asked  # no one is reported
        if rec is None or metrics.round != rec.number or (client not in rec.reported and not secure_asked):
            log.debug("metrics from %s for round %s not recorded", client, metrics.round)
            return
        rec.metrics[client] = {k: getattr(metrics, k, None) for k in METRIC_FIELDS}
        self._journal(rec, METRICS, client, rec.metrics[client])

    @property
    def errored(self) -> Set[str]:
        """Online clients whose latest status is `error`."""
        return self.online & set(self.watch.errors)

    @property
    def available(self) -> Set[str]:
        """Clients that can train now: online and not in `error` (what an extension counts and samples)."""
        return self.online - set(self.watch.errors)

    def _handle_event(self, kind: str, client: str, payload: bytes, token: Optional[AckToken]) -> Optional[AckToken]:
        """Handle one queued message; the ack token of an update, to send once its outcome is durable.

        An exception other than the three below (an OSError writing the journal) propagates unacknowledged.
        """
        try:
            self._dispatch(kind, client, payload)
        except OSError:  # the state dir failed: fatal, and the update stays unacknowledged
            raise
        except Exception as exc:  # a message that slipped past validation: never a crash (nor a crash loop)
            log.exception("a %s message from %s could not be handled: %s", kind, client, wire.short(str(exc), 200))
            if kind in ("update", BAD_UPDATE):
                self._count_unhandled(client, exc, len(payload))
        finally:
            if kind in ("update", BAD_UPDATE, SECAGG):
                self._room.give(len(payload))
        return token

    def _count_unhandled(self, client: str, exc: Exception, size: int) -> None:
        """Count an update whose handling raised as `malformed` (saved before it is acknowledged)."""
        detail = f"could not be handled: {type(exc).__name__}: {wire.short(str(exc), 120)}"
        if self.current is not None:
            self._reject(self.current, client, "malformed", detail, size, save=True)
        else:
            self._no_round_record().add(client, detail, size, "malformed")
            self._no_round_dirty = True

    def _drain(self, timeout: float) -> None:
        """Handle every queued message (waiting up to `timeout` for the first), then make their outcomes durable
        with one sync of the journal and acknowledge the updates among them (group commit)."""
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            self.watch.tick(self.state, self.current)
            return
        tokens = []
        try:
            while True:
                token = self._handle_event(*event)
                if token is not None:
                    tokens.append(token)
                if self._buffer_full():  # async: the K-th update closes the buffer before the next is handled
                    self._settle(tokens)
                    tokens = []
                    self._close_round()
                if len(tokens) >= MAX_BATCH:
                    break
                try:
                    event = self.events.get_nowait()
                except queue.Empty:
                    break
        finally:  # what was handled before an exception (a failed journal write) is still made durable and acked
            self._settle(tokens)
        self._handle_held_statuses()
        self.watch.tick(self.state, self.current)

    def _buffer_full(self) -> bool:
        """Whether the open round must close before another message is handled (never, in sync rounds)."""
        return False

    def _settle(self, tokens: Sequence[AckToken]) -> None:
        """One sync of the journal (and a save of the no-round record if it changed), then the PUBACKs of the
        updates they made durable."""
        if self._no_round_dirty and self.no_round is not None:
            self.checkpoint.save_no_round(self.no_round.round, self.no_round.to_json())
        self._no_round_dirty = False
        if tokens:
            self.checkpoint.sync()
            for token in tokens:
                self._ack(token)

    def _handle_held_statuses(self) -> None:
        """The latest status of each client that went over its rate (one per client, whatever it sent)."""
        with self._held_lock:
            held, self._held_statuses = self._held_statuses, {}
        for client, payload in held.items():
            self._handle_event("status", client, payload, None)

    def _wait_for_clients(self, need: int, timeout: Optional[float] = None) -> None:
        """Process messages until `need` clients are online; ClientsAbsent after `timeout` seconds if given."""
        start = time.monotonic()
        next_note = start
        if self.secagg is not None:
            need = max(need, self.secagg.need())
            self.secagg.load_registry()
        while len(self._participants()) < need and not self.stop_event.is_set():
            now = time.monotonic()
            if timeout is not None and now - start > timeout:
                raise ClientsAbsent(f"only {len(self._participants())} of {need} clients came online within "
                                    f"{timeout:g} s" + (" (enrolled ones count)" if self.secagg is not None else ""))
            if now >= next_note:
                log.info("waiting for %d client(s) to come online (%d now)", need, len(self._participants()))
                next_note = now + 60.0
            self._drain(0.1)
            self._maybe_republish()

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> int:
        """Run until every round is done (0) or `stop()` (0); raises on a broker or state-dir failure, and
        QuorumError when a round stays below quorum through `max_extensions` extensions."""
        self.checkpoint.lock()
        try:
            self._resume_or_start()
            assert self.state is not None
            self.connection.start()
        except BaseException:
            self.checkpoint.unlock()
            raise
        try:
            if self.current is not None:
                self._announce(self.current)  # the checkpointed global, then the resumed round
            else:
                self._publish(self.topics.global_, self.global_blob, retain=True)
            if self.current is None and not self.state.done:
                self._wait_for_clients(max(self.cfg.wait_for_clients, self.cfg.sampling.min_clients),
                                       self.cfg.wait_timeout_s)
            while not self.stop_event.is_set():
                if self.current is None:
                    if self.state.done:
                        self._announce_done()
                        log.info("federation %r done: %d rounds", self.cfg.federation, self.state.round,
                                 extra=fields("done", round=self.state.round))
                        return 0
                    self._wait_for_clients(self.cfg.sampling.min_clients)
                    if not self.stop_event.is_set():
                        self._open_round()
                    continue
                self._drain(0.05)
                self._maybe_republish()
                if self.current is not None:  # an async buffer may have closed the last version while draining
                    self._tick()
            log.info("stopped%s", f" in round {self.current.number} (resumes there)" if self.current else "")
            return 0
        finally:
            self.stop_event.set()  # frees paho's thread if it waits for room in the queue
            self.connection.stop()
            self.watch.tick(self.state, self.current, force=True)
            self.checkpoint.unlock()

    def _tick(self) -> None:
        """Close, extend (and re-announce) or give up on the open round, as the round clock says."""
        rec = self.current
        assert rec is not None
        if self._snapshot_dirty and time.monotonic() - self._snapshot_at >= SNAPSHOT_EVERY_S:
            self._save_round(rec)
        if self.secagg is not None and self.secagg.round is not None:
            self._tick_secure(rec)  # a secure round closes when an attempt completes, not by the round clock
            return
        step = self.rounds.step(rec, self.available, self.watch.errors)
        for client in step.errored:  # once per round each
            error = self.watch.errors[client]
            log.warning("round %d: %s is in error (%s), not waiting for it: %s", rec.number, client,
                        error.code or "no code", error.message or "no message",
                        extra=fields("client-error", round=rec.number, client=client, reason=error.code))
        if step.errored:
            self._save_round(rec)
        if step.action == WAIT:
            self._ask_again(rec)
        if step.action == CLOSE:
            self._close_round()
        elif step.action == EXTEND:
            log.warning("round %d: %d of %d needed update(s) at the deadline; extended by %.0f s%s", rec.number,
                        len(rec.reported), self.rounds.min_clients, self.cfg.round_timeout_s,
                        f", also asking {step.added}" if step.added else "",
                        extra=fields("round-extended", round=rec.number, reason="below-quorum"))
            self._save_round(rec)
            self.strategy.set_round_size(len(rec.asked))
            self._announce(rec)
        elif step.action == GIVE_UP:
            self._save_round(rec)
            raise QuorumError(
                f"round {rec.number}: {len(rec.reported)} of {self.rounds.min_clients} needed update(s) after "
                f"{rec.extensions} extension(s) (--max-extensions {self.cfg.max_extensions}); stopping with the "
                f"round kept open: a restart resumes it")

    def _tick_secure(self, rec: RoundRecord) -> None:
        """Carry out what the secure round says: re-announce, publish, then fail or fold the sum and close."""
        assert self.secagg is not None
        step = self.secagg.tick(rec, self.available, self.global_tensors)
        if step.reannounce:
            self._save_round(rec)
            self._announce(rec)
        self._publish_all(step.publish)
        if step.fail is not None:
            self._fail_round(rec, step.fail)
        elif step.fold is not None:
            self.strategy.accumulate_partial(*step.fold)
            self._close_round()

    def _ask_again(self, rec: RoundRecord) -> None:
        """Asked clients that say they submitted this round, whose update never came (a broker dropped it):
        announce the round again with them in `resend`, so each sends its stored update once more."""
        due = rec.due_resends(self.clock(), RESEND_AFTER_S, RESEND_ATTEMPTS)
        if not due:
            return
        log.warning("round %d: no update came from %s though their status says they submitted it: asking them to "
                    "send it again", rec.number, due)
        self._save_round(rec)
        self._announce(rec)

    def stop(self) -> None:
        self.stop_event.set()


def non_finite_evaluation(row: Dict[str, Any]) -> Optional[str]:
    """Why a new global must be rolled back: its held-out evaluation (the row's `test_loss`/`test_accuracy`,
    from `on_round_closed`) is not finite; None if it is, or if there is none."""
    for key in EVAL_FIELDS:
        value = row.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            return f"the held-out evaluation of the new global is not finite ({key} = {value}): rolled back"
    return None


def _is_published(info) -> Optional[bool]:
    """Whether the broker acknowledged a QoS 1 publish; None if it was published while disconnected (paho
    then sends it after reconnecting, and its is_published() raises for good)."""
    try:
        return info.is_published()
    except RuntimeError:
        return None


def _claimed_round(blob: bytes) -> str:
    """The `round` an update's header names, for a log line ("?" if unreadable), never long."""
    try:
        _, meta = adapter.read_header(blob)
    except adapter.AdapterError:
        return "?"
    return str(meta.get("round", "?"))[:20]
