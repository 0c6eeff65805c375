"""flora-agent: trains the bundle's LoRA adapter on this device's images, round by round, over MQTT.

paho's network thread only queues incoming messages; the main thread applies them, trains and
publishes. The protocol is docs/protocol.md.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from . import adapter as adapter_blob
from .bundle import Bundle, load_bundle
from .dataset import few_shot, load_dataset, train_val_split
from .features import FeatureCache, image_features
from .fileio import sha256_bytes
from .mqtt import BrokerConfig, Connection, make_client
from .protocol import (
    QOS,
    ROUND_DONE,
    Metrics,
    ProtocolError,
    RoundAnnouncement,
    Status,
    Topics,
    check_id,
    round_config_warnings,
)
from .state import AgentState, StateStore
from .trainers import Trainer, available_backends, open_trainer
from .training import LocalData, Stopped, evaluate, train_round

log = logging.getLogger("flora.agent")


@dataclass
class AgentConfig:
    bundle: Path
    data: Path
    broker: str
    client_id: str
    federation: str = "default"
    state_dir: Optional[Path] = None  # default: ./flora-state/<client_id>
    backend: str = "auto"
    threads: Optional[int] = None
    providers: Optional[List[str]] = None
    shots: Optional[int] = None
    val_fraction: float = 0.1
    seed: int = 0
    fp16_updates: bool = False
    exit_when_done: bool = False
    username: Optional[str] = None
    password: Optional[str] = None
    tls_ca: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    session_expiry_s: int = 3600
    progress_every_s: float = 5.0
    feature_batch_size: int = 32
    connect_timeout_s: float = 30.0

    def resolved_state_dir(self) -> Path:
        return Path(self.state_dir) if self.state_dir else Path("flora-state") / self.client_id


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        check_id(cfg.client_id)
        self.topics = Topics(cfg.federation)
        self.bundle, self.trainer = self._open_bundle()
        self.manifest = self.bundle.manifest
        self.store = StateStore(cfg.resolved_state_dir())
        self.state = self._load_state()
        self.train_data, self.val_data = self._load_data()
        self.events: queue.Queue[Tuple[str, bytes]] = queue.Queue()
        self.stop_event = threading.Event()
        self.done = False
        self.round: Optional[RoundAnnouncement] = None
        self.global_blob: Optional[bytes] = None
        self.global_sha: Optional[str] = None
        self.global_adapter: Optional[adapter_blob.Adapter] = None
        self._said: set = set()
        self.broker_cfg = BrokerConfig.from_url(
            cfg.broker, username=cfg.username, password=cfg.password, ca_file=cfg.tls_ca,
            cert_file=cfg.tls_cert, key_file=cfg.tls_key, session_expiry_s=cfg.session_expiry_s,
        )
        will = self._status("offline").to_json()
        self.client = make_client(self.broker_cfg, cfg.client_id, will_topic=self.topics.status(cfg.client_id),
                                  will_payload=will)
        self.client.on_message = self._on_message
        self.connection = Connection(self.broker_cfg, self.client, on_connected=self._on_connected)

    # -- setup -------------------------------------------------------------------------------
    def _open_bundle(self) -> Tuple[Bundle, Trainer]:
        unverified = load_bundle(self.cfg.bundle, verify=False)
        usable = available_backends(unverified)
        backend = self.cfg.backend if self.cfg.backend != "auto" else (usable[0] if usable else "auto")
        bundle = load_bundle(self.cfg.bundle, backends=[backend] if backend != "auto" else None)
        trainer = open_trainer(bundle, backend, threads=self.cfg.threads, providers=self.cfg.providers)
        log.info("bundle %s: %s, LoRA %s tower rank %d, %d classes, model_id %s; trainer %s",
                 bundle.root, bundle.manifest.preset, bundle.manifest.lora.tower, bundle.manifest.lora.rank,
                 bundle.manifest.num_classes, bundle.manifest.model_id[:16], trainer.name)
        return bundle, trainer

    def _load_state(self) -> AgentState:
        state = self.store.load()
        if state.model_id not in (None, self.manifest.model_id):
            log.warning("state dir %s belongs to model %s; this bundle is %s: starting a fresh state",
                        self.store.dir, state.model_id[:16], self.manifest.model_id[:16])
            state = AgentState()
        state.client_id = self.cfg.client_id
        state.model_id = self.manifest.model_id
        self.store.save(state)
        if state.last_submitted_round is not None:
            log.info("resuming: last submitted round %d", state.last_submitted_round)
        return state

    def _load_data(self) -> Tuple[LocalData, LocalData]:
        cfg, manifest = self.cfg, self.manifest
        samples = load_dataset(cfg.data, list(manifest.classes))
        if not samples:
            raise ValueError(f"no images for the bundle's classes under {cfg.data}")
        if cfg.shots:
            samples = few_shot(samples, cfg.shots, cfg.seed)
        train, val = train_val_split(samples, cfg.val_fraction, cfg.seed)
        log.info("data %s: %d training and %d validation images", cfg.data, len(train), len(val))

        def labels_of(part) -> np.ndarray:
            return np.array([s.label for s in part], dtype=np.int64)

        if not manifest.needs_image_encoder:  # pixels are decoded batch by batch while training
            return tuple(LocalData(labels_of(p), paths=[s.path for s in p], preprocess=manifest.preprocess)
                         for p in (train, val))
        # text mode: image features once per image (cached on disk across rounds and restarts)
        cache = FeatureCache(self.store.dir / "features.sqlite")
        try:
            feats = image_features(self.bundle, [s.path for s in train + val], cache,
                                   batch_size=cfg.feature_batch_size, threads=cfg.threads, providers=cfg.providers)
        finally:
            cache.close()
        return (LocalData(labels_of(train), features=feats[: len(train)]),
                LocalData(labels_of(val), features=feats[len(train):]))

    # -- MQTT callbacks (paho's thread) ------------------------------------------------------
    def _on_connected(self, client) -> None:
        client.subscribe([(self.topics.global_, QOS), (self.topics.round, QOS)])
        self.events.put(("connected", b""))

    def _on_message(self, client, userdata, message) -> None:
        if message.topic == self.topics.global_:
            self.events.put(("global", bytes(message.payload)))
        elif message.topic == self.topics.round:
            self.events.put(("round", bytes(message.payload)))

    # -- helpers -----------------------------------------------------------------------------
    def _status(self, state: str, error: Optional[str] = None) -> Status:
        return Status(self.cfg.client_id, state, self.round.round if self.round else None, error,
                      len(self.train_data) if hasattr(self, "train_data") else None,
                      self.trainer.name, time.time())

    def publish_status(self, state: str, error: Optional[str] = None) -> None:
        self.client.publish(self.topics.status(self.cfg.client_id), self._status(state, error).to_json(),
                            qos=QOS, retain=True)

    def _say_once(self, key: str, level: int, msg: str, *args) -> None:
        if key not in self._said:
            self._said.add(key)
            log.log(level, msg, *args)

    def _publish_and_wait(self, topic: str, payload: bytes, timeout: float = 60.0) -> bool:
        """QoS 1 publish; True once the broker acknowledged it. While disconnected paho keeps the
        message queued and sends it on reconnect, so a False here is not a loss."""
        info = self.client.publish(topic, payload, qos=QOS)
        deadline = time.monotonic() + timeout
        while not info.is_published():
            if time.monotonic() > deadline or self.stop_event.is_set():
                return False
            time.sleep(0.05)
        return True

    # -- message handling (main thread) ------------------------------------------------------
    def handle(self, kind: str, payload: bytes) -> None:
        if kind == "connected":
            self.publish_status("online")
            self._resend_outbox()
        elif kind == "global":
            self._handle_global(payload)
        elif kind == "round":
            try:
                self.round = RoundAnnouncement.from_json(payload)
            except ProtocolError as exc:
                log.warning("ignored a malformed round message: %s", exc)

    def _handle_global(self, payload: bytes) -> None:
        try:
            decoded = adapter_blob.decode(
                payload, self.manifest.trainable, model_id=self.manifest.model_id,
                max_bytes=adapter_blob.max_blob_bytes(self.manifest.trainable),
            )
        except adapter_blob.AdapterError as exc:
            log.error("refused the global adapter: %s", exc)
            self.publish_status("error", f"refused global adapter: {exc}")
            return
        if decoded.meta.kind not in ("global", "initial"):
            log.error("refused the global adapter: its kind is %r", decoded.meta.kind)
            return
        self.global_blob, self.global_adapter = payload, decoded
        self.global_sha = sha256_bytes(payload)
        log.info("received the global adapter of round %d (%d bytes)", decoded.meta.round, len(payload))

    def _resend_outbox(self) -> None:
        s = self.state
        if s.outbox_round is None or s.outbox_sent:
            return
        blob = self.store.outbox()
        if blob is None:
            return
        log.info("re-sending the stored update of round %d (not acknowledged before a restart)", s.outbox_round)
        if self._publish_and_wait(self.topics.update(self.cfg.client_id), blob):
            self.store.mark_sent(s)

    def maybe_train(self) -> None:
        r = self.round
        if r is None:
            return
        if r.model_id != self.manifest.model_id:
            self._say_once(f"model-{r.round}", logging.ERROR,
                           "round %d is for model %s, this bundle is %s: not training", r.round, r.model_id[:16],
                           self.manifest.model_id[:16])
            return
        if r.state == ROUND_DONE:
            if not self.done:
                log.info("the federation is done after %d rounds", r.total_rounds)
                self.done = True
                self.publish_status("idle")
            return
        if not r.asks(self.cfg.client_id):
            self._say_once(f"skip-{r.round}", logging.INFO, "round %d does not ask this client", r.round)
            return
        if self.state.submitted(r.round):
            self._say_once(f"done-{r.round}", logging.INFO, "round %d was already submitted", r.round)
            return
        if self.global_sha != r.global_sha256:
            self._say_once(f"wait-{r.round}-{self.global_sha}", logging.INFO,
                           "round %d: waiting for its global adapter", r.round)
            return
        self.train(r)

    def train(self, r: RoundAnnouncement) -> None:
        assert self.global_adapter is not None and self.global_blob is not None
        cfg = r.config
        log.info("round %d: training %d epochs, lr %g, batch %d on %d images", r.round, cfg.epochs, cfg.lr,
                 cfg.batch_size, len(self.train_data))
        self.publish_status("training")
        self.trainer.set_adapter(self.global_adapter.as_float32())  # into the live session
        self.store.save_global(self.global_blob)
        self.state.global_round, self.state.global_sha256 = self.global_adapter.meta.round, self.global_sha
        self.trainer.set_lr(cfg.lr)
        self.trainer.set_weight_decay(cfg.weight_decay)
        for warning in round_config_warnings(cfg, self.manifest, self.trainer.name):
            log.warning(warning)
        result = train_round(
            self.trainer, self.train_data, epochs=cfg.epochs, batch_size=cfg.batch_size,
            seed=self.cfg.seed * 100003 + r.round, progress=lambda line: log.info("round %d: %s", r.round, line),
            progress_every_s=self.cfg.progress_every_s, should_stop=self.stop_event.is_set,
        )
        val = evaluate(self.trainer, self.val_data)
        tensors = self.trainer.get_adapter()
        blob = adapter_blob.encode(
            tensors, model_id=self.manifest.model_id, round=r.round, kind="update",
            dtype="float16" if self.cfg.fp16_updates else "float32", client_id=self.cfg.client_id,
            num_samples=len(self.train_data),
        )
        self.store.stash_update(self.state, r.round, blob)  # from here on this round counts as submitted
        sent = self._publish_and_wait(self.topics.update(self.cfg.client_id), blob)
        if sent:
            self.store.mark_sent(self.state)
        metrics = Metrics(
            client_id=self.cfg.client_id, round=r.round, loss=result.loss,
            accuracy=val.accuracy if val else None, train_accuracy=result.train_accuracy,
            samples=result.samples, steps=result.steps, epochs=result.epochs, wall_time_s=result.wall_time_s,
            step_time_s=result.step_time_s, peak_rss_mb=result.peak_rss_mb, backend=self.trainer.name,
            extra={"val_loss": val.loss if val else None, "images_per_s": result.images_per_s,
                   "update_bytes": len(blob)},
        )
        self.client.publish(self.topics.metrics(self.cfg.client_id), metrics.to_json(), qos=QOS)
        log.info("round %d: sent update (%d bytes%s): train loss %.4f acc %.3f, val acc %s, %.1f s, "
                 "%.1f ms/step, peak RSS %.0f MiB", r.round, len(blob), "" if sent else ", queued until reconnect",
                 result.loss, result.train_accuracy, f"{val.accuracy:.3f}" if val else "n/a", result.wall_time_s,
                 1e3 * result.step_time_s, result.peak_rss_mb)
        self.publish_status("idle")

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> int:
        log.info("client %s joining federation %r at %s", self.cfg.client_id, self.cfg.federation,
                 self.broker_cfg.describe())
        self.connection.start(timeout=self.cfg.connect_timeout_s)
        try:
            while not self.stop_event.is_set():
                try:
                    kind, payload = self.events.get(timeout=0.5)
                except queue.Empty:
                    continue
                self.handle(kind, payload)
                while True:  # apply everything queued before deciding to train
                    try:
                        self.handle(*self.events.get_nowait())
                    except queue.Empty:
                        break
                try:
                    self.maybe_train()
                except Stopped:
                    log.info("stopped in the middle of a round; it was not submitted")
                    break
                if self.done and self.cfg.exit_when_done:
                    break
        finally:
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        try:
            if self.connection.connected.is_set():
                info = self.client.publish(self.topics.status(self.cfg.client_id), self._status("offline").to_json(),
                                           qos=QOS, retain=True)
                info.wait_for_publish(timeout=5)
        except (RuntimeError, ValueError):
            pass
        self.connection.stop()

    def stop(self) -> None:
        self.stop_event.set()
