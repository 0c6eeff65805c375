"""flora-aggregator: runs rounds over MQTT, validates and averages updates, checkpoints, survives restarts.

paho's network thread only queues incoming messages; the main thread validates, folds, closes rounds
and publishes. The protocol is docs/protocol.md.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set, Tuple

import numpy as np

from edge import adapter
from edge.bundle import Manifest
from edge.fileio import sha256_bytes
from edge.mqtt import BrokerConfig, Connection, make_client
from edge.protocol import (
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

from .checkpoint import AggregatorState, Checkpoint, CheckpointError
from .rounds import RoundClock, RoundRecord, Sampling
from .strategies import make_strategy
from .validation import Rejected, validate_update

log = logging.getLogger("flora.aggregator")

ONLINE_STATES = ("online", "idle", "training", "error")
Evaluator = Callable[[Dict[str, np.ndarray]], Dict[str, float]]


@dataclass
class AggregatorConfig:
    manifest: Manifest
    initial_adapter: Dict[str, np.ndarray]
    broker: str
    state_dir: Path
    rounds: int
    federation: str = "default"
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: Sampling = field(default_factory=Sampling)
    round_timeout_s: float = 300.0
    wait_for_clients: int = 0
    wait_timeout_s: float = 600.0
    metrics_grace_s: float = 1.0
    strategy: str = "fedavg"
    max_update_bytes: Optional[int] = None
    evaluator: Optional[Evaluator] = None
    client_id: str = "flora-aggregator"
    username: Optional[str] = None
    password: Optional[str] = None
    tls_ca: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None


class Aggregator:
    def __init__(self, cfg: AggregatorConfig, clock: Callable[[], float] = time.time) -> None:
        if cfg.rounds < 1:
            raise ValueError("--rounds must be >= 1")
        self.cfg = cfg
        self.manifest = cfg.manifest
        self.topics = Topics(cfg.federation)
        self.clock = clock
        self.rounds = RoundClock(cfg.sampling.min_clients, cfg.round_timeout_s, clock)
        self.strategy = make_strategy(cfg.strategy)
        self.checkpoint = Checkpoint(cfg.state_dir)
        self.max_bytes = cfg.max_update_bytes or adapter.max_blob_bytes(self.manifest.trainable)
        self.events: queue.Queue[Tuple[str, str, bytes]] = queue.Queue()
        self.stop_event = threading.Event()
        self.online: Set[str] = set()
        self.current: Optional[RoundRecord] = None
        self.state: Optional[AggregatorState] = None
        self.global_blob = b""
        self.global_tensors: Dict[str, np.ndarray] = {}
        self._complete_since: Optional[float] = None
        self.broker_cfg = BrokerConfig.from_url(cfg.broker, username=cfg.username, password=cfg.password,
                                                ca_file=cfg.tls_ca, cert_file=cfg.tls_cert, key_file=cfg.tls_key)
        self.client = make_client(self.broker_cfg, cfg.client_id)
        self.client.on_message = self._on_message
        self.connection = Connection(self.broker_cfg, self.client, on_connected=self._on_connected)

    # -- MQTT (paho's thread) ----------------------------------------------------------------
    def _on_connected(self, client) -> None:
        client.subscribe([(self.topics.all_updates, QOS), (self.topics.all_status, QOS),
                          (self.topics.all_metrics, QOS)])

    def _on_message(self, client, userdata, msg) -> None:
        for kind in ("update", "status", "metrics"):
            who = self.topics.client_of(msg.topic, kind)
            if who is not None:
                self.events.put((kind, who, bytes(msg.payload)))
                return

    def _publish(self, topic: str, payload: bytes, retain: bool, wait: float = 30.0) -> None:
        info = self.client.publish(topic, payload, qos=QOS, retain=retain)
        deadline = time.monotonic() + wait
        while not info.is_published() and time.monotonic() < deadline and not self.stop_event.is_set():
            time.sleep(0.02)

    # -- state -------------------------------------------------------------------------------
    def _resume_or_start(self) -> None:
        try:
            loaded = self.checkpoint.load()
        except CheckpointError:
            raise
        if loaded is None:
            blob = adapter.encode(self.cfg.initial_adapter, model_id=self.manifest.model_id, round=0, kind="global")
            self.state = self.checkpoint.start(self.manifest.model_id, self.cfg.rounds, blob)
            if self.cfg.evaluator is not None:
                self.state.extra["initial_eval"] = self.cfg.evaluator(adapter.decode(blob).as_float32())
                self.checkpoint.save(self.state)
            log.info("starting a new federation %r: %d rounds", self.cfg.federation, self.cfg.rounds)
        else:
            self.state, blob = loaded
            if self.state.model_id != self.manifest.model_id:
                raise CheckpointError(
                    f"state dir {self.checkpoint.dir} belongs to model {self.state.model_id[:16]}, the bundle is "
                    f"{self.manifest.model_id[:16]}: use another --state-dir"
                )
            if self.state.rounds_total != self.cfg.rounds:
                log.info("rounds changed from %d to %d", self.state.rounds_total, self.cfg.rounds)
                self.state.rounds_total = self.cfg.rounds
            log.info("resuming at round %d from %s", self.state.round, self.checkpoint.dir)
        decoded = adapter.decode(blob, self.manifest.trainable, model_id=self.manifest.model_id)
        self.global_blob = blob
        self.global_tensors = decoded.as_float32()

    # -- rounds ------------------------------------------------------------------------------
    def _announce(self, rec: RoundRecord) -> None:
        ann = RoundAnnouncement(
            round=rec.number, model_id=self.manifest.model_id, state=ROUND_TRAINING, config=self.cfg.train,
            clients=sorted(rec.asked), deadline=rec.deadline, global_sha256=sha256_bytes(self.global_blob),
            total_rounds=self.state.rounds_total,
        )
        self._publish(self.topics.round, ann.to_json(), retain=True)

    def _announce_done(self) -> None:
        ann = RoundAnnouncement(
            round=self.state.round, model_id=self.manifest.model_id, state=ROUND_DONE, config=self.cfg.train,
            clients=[], deadline=self.clock(), global_sha256=sha256_bytes(self.global_blob),
            total_rounds=self.state.rounds_total,
        )
        self._publish(self.topics.round, ann.to_json(), retain=True)

    def _open_round(self) -> None:
        number = self.state.round
        asked = self.cfg.sampling.choose(self.online, number)
        self.current = self.rounds.open(number, asked)
        self._complete_since = None
        self.strategy.begin(self.manifest.trainable, self.global_tensors)
        for client, blob in self.checkpoint.spooled(number):  # accepted before a restart
            self._fold(client, blob, spool=False)
        self._announce(self.current)
        log.info("round %d open: asked %d client(s) %s, deadline in %.0f s%s", number, len(asked), sorted(asked),
                 self.cfg.round_timeout_s,
                 f", {len(self.current.reported)} update(s) restored from the spool" if self.current.reported else "")

    def _fold(self, client: str, blob: bytes, spool: bool = True) -> None:
        rec = self.current
        assert rec is not None
        try:
            update = validate_update(blob, client, self.manifest, current_round=rec.number, asked=rec.asked,
                                     already=set(rec.reported), max_bytes=self.max_bytes)
        except Rejected as why:
            rec.reject(client, why.reason, why.detail, len(blob))
            log.warning("round %d: rejected update from %s: %s", rec.number, client, why)
            return
        if spool:
            self.checkpoint.spool(rec.number, client, blob)
        self.strategy.accumulate(update.tensors, update.meta.num_samples)
        rec.accept(client, update.meta.num_samples, len(blob))
        log.info("round %d: accepted update from %s (%d samples, %d bytes, %s); %d/%d reported", rec.number, client,
                 update.meta.num_samples, len(blob), update.meta.dtype, len(rec.reported), len(rec.asked))

    def _close_round(self) -> None:
        rec = self.current
        assert rec is not None and self.state is not None
        new = self.strategy.finalize()
        assert new is not None  # a round closes only with at least min_clients >= 1 updates
        next_round = rec.number + 1
        done = next_round >= self.state.rounds_total
        blob = adapter.encode(new, model_id=self.manifest.model_id, round=next_round, kind="global")
        row = self._history_row(rec, new)
        self.checkpoint.commit(self.state, next_round, blob, row, done)
        self.global_blob, self.global_tensors = blob, new
        self._publish(self.topics.global_, blob, retain=True)
        log.info("round %d closed: %d update(s), %d rejected %s, %.1f s%s", rec.number, len(rec.reported),
                 len(rec.rejected), rec.rejection_counts or "", row["wall_time_s"],
                 f", test accuracy {row['test_accuracy']:.4f}" if "test_accuracy" in row else "")
        self.current = None

    def _history_row(self, rec: RoundRecord, new: Dict[str, np.ndarray]) -> Dict:
        accs = [m["accuracy"] for m in rec.metrics.values() if m.get("accuracy") is not None]
        losses = [m["loss"] for m in rec.metrics.values() if m.get("loss") is not None]
        row = {
            "round": rec.number,
            "strategy": self.strategy.name,
            "asked": sorted(rec.asked),
            "reported": dict(sorted(rec.reported.items())),
            "num_asked": len(rec.asked),
            "num_reported": len(rec.reported),
            "samples": int(sum(rec.reported.values())),
            "rejected": rec.rejected,
            "rejection_counts": rec.rejection_counts,
            "bytes_received": rec.bytes_received,
            "bytes_rejected": rec.bytes_rejected,
            "global_bytes": len(self.global_blob),
            "bytes_sent": len(self.global_blob) * len(rec.asked),
            "extensions": rec.extensions,
            "wall_time_s": round(self.clock() - rec.started_at, 3),
            "closed_at": self.clock(),
            "metrics": rec.metrics,
            "mean_client_accuracy": float(np.mean(accs)) if accs else None,
            "mean_client_loss": float(np.mean(losses)) if losses else None,
        }
        if self.cfg.evaluator is not None:
            row.update(self.cfg.evaluator(new))
        return row

    # -- events ------------------------------------------------------------------------------
    def handle(self, kind: str, client: str, payload: bytes) -> None:
        if kind == "status":
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
            if was_online != (client in self.online):
                log.info("client %s is %s (%d online)", client, status.state, len(self.online))
        elif kind == "metrics":
            try:
                metrics = Metrics.from_json(payload)
            except ProtocolError as exc:
                log.warning("ignored malformed metrics from %s: %s", client, exc)
                return
            rec = self.current
            if rec is not None and metrics.round == rec.number and client in rec.reported:
                rec.metrics[client] = {k: getattr(metrics, k) for k in (
                    "loss", "accuracy", "train_accuracy", "samples", "steps", "wall_time_s", "step_time_s",
                    "peak_rss_mb", "backend")}
        elif kind == "update":
            if self.current is None:
                log.warning("update from %s while no round is open: ignored", client)
                return
            self._fold(client, payload)

    def _drain(self, timeout: float) -> None:
        try:
            self.handle(*self.events.get(timeout=timeout))
        except queue.Empty:
            return
        while True:
            try:
                self.handle(*self.events.get_nowait())
            except queue.Empty:
                return

    def _ready_to_close(self) -> bool:
        rec = self.current
        assert rec is not None
        if self.rounds.complete(rec):
            # everyone reported: give their metrics messages (sent right after the update) a moment
            now = self.clock()
            self._complete_since = self._complete_since or now
            have_metrics = set(rec.metrics) >= set(rec.reported)
            return have_metrics or now - self._complete_since >= self.cfg.metrics_grace_s
        return self.rounds.due(rec) and self.rounds.quorum(rec)

    def _wait_for_clients(self, need: int, timeout: Optional[float] = None) -> None:
        """Process messages until `need` clients are online; raise after `timeout` seconds if given."""
        start = time.monotonic()
        next_note = start
        while len(self.online) < need and not self.stop_event.is_set():
            now = time.monotonic()
            if timeout is not None and now - start > timeout:
                raise TimeoutError(f"only {len(self.online)} of {need} clients came online within {timeout:.0f} s")
            if now >= next_note:
                log.info("waiting for %d client(s) to come online (%d now)", need, len(self.online))
                next_note = now + 60.0
            self._drain(0.2)

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> int:
        self._resume_or_start()
        self.connection.start()
        try:
            self._publish(self.topics.global_, self.global_blob, retain=True)
            if self.state.done:
                self._announce_done()
                log.info("the federation already finished %d rounds", self.state.round)
                return 0
            self._wait_for_clients(max(self.cfg.wait_for_clients, self.cfg.sampling.min_clients),
                                   self.cfg.wait_timeout_s)
            while not self.stop_event.is_set():
                if self.current is None:
                    if self.state.done:
                        self._announce_done()
                        log.info("federation done: %d rounds", self.state.round)
                        return 0
                    self._wait_for_clients(self.cfg.sampling.min_clients)
                    self._open_round()
                self._drain(0.1)
                rec = self.current
                if rec is None:
                    continue
                if self._ready_to_close():
                    self._close_round()
                elif self.rounds.due(rec):
                    added = self.rounds.extend(rec, self.online, self.cfg.sampling)
                    log.warning("round %d: %d of %d needed updates at the deadline; extended by %.0f s%s",
                                rec.number, len(rec.reported), self.rounds.min_clients, self.cfg.round_timeout_s,
                                f", also asking {added}" if added else "")
                    self._announce(rec)
            return 0
        finally:
            self.connection.stop()

    def stop(self) -> None:
        self.stop_event.set()

    def asked_history(self) -> List[Dict]:
        return self.checkpoint.history()
