"""flora-agent: trains the bundle's LoRA adapter on this device's images, round by round, over MQTT.

paho's network thread only queues incoming messages; the main thread applies them, trains and
publishes. The protocol is docs/protocol.md.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np

from . import adapter as adapter_blob
from .bundle import Bundle, Manifest, load_bundle
from .dataset import DatasetError, Sample, load_dataset, report_unreadable, split_local, unreadable_images
from .features import FeatureCache, ProgressMeter, readable_image_features
from .fileio import sha256_bytes
from .mqtt import BrokerConfig, Connection, make_client
from .preprocess import ImageError
from .protocol import (
    PROTOCOL_VERSION,
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
from .trainers import Trainer, TrainerError, available_backends, open_trainer
from .training import Evaluation, LocalData, RoundResult, Stopped, eval_batch_size, evaluate, train_round

log = logging.getLogger("flora.agent")


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
    seed: int = 0
    fp16_updates: bool = False
    exit_when_done: bool = False
    progress_every_s: float = 5.0
    feature_batch_size: int = 32
    connect_timeout_s: float = 30.0
    publish_timeout_s: float = 60.0  # how long a round waits for the broker to acknowledge its update

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


def newer_protocol(payload: bytes) -> Optional[int]:
    """The `protocol` of a JSON message when it is newer than this agent's, else None."""
    try:
        version = json.loads(payload).get("protocol")
    except (ValueError, AttributeError):  # not JSON, or not an object: from_json says why
        return None
    return version if isinstance(version, int) and version > PROTOCOL_VERSION else None


def _labels(samples: List[Sample]) -> np.ndarray:
    return np.array([s.label for s in samples], dtype=np.int64)


def _pixel_data(samples: List[Sample], manifest: Manifest) -> LocalData:
    """Images decoded batch by batch while training (vision mode)."""
    return LocalData(_labels(samples), paths=[s.path for s in samples], preprocess=manifest.preprocess)


def _without(samples: List[Sample], bad: Dict[int, str], offset: int) -> List[Sample]:
    """`samples` less those whose index + offset is in `bad`."""
    return [s for i, s in enumerate(samples) if i + offset not in bad]


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        check_id(cfg.client_id)
        self.topics = Topics(cfg.federation)
        self.bundle, self.trainer = self._open_bundle()
        self.backend = self.trainer.name
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
        self._said: Set[str] = set()
        self._failed: Set[Tuple[str, int]] = set()  # (run_id, round) that failed in this process
        self._inflight: Optional[InFlight] = None
        self._resend_pending = self.state.outbox_pending  # an update stored before a restart, not acked
        self._acks = Acks()
        self.broker_cfg = cfg.broker
        will = self._status("offline").to_json()
        self.client = make_client(self.broker_cfg, cfg.client_id, will_topic=self.topics.status(cfg.client_id),
                                  will_payload=will)
        self.client.on_message = self._on_message
        self.client.on_publish = self._acks.on_publish
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
        if state.federation not in (None, self.cfg.federation):
            log.warning("state dir %s recorded the rounds of federation %r, this is %r: starting a fresh "
                        "record of submitted rounds", self.store.dir, state.federation, self.cfg.federation)
            self.store.start_run(state, self.cfg.federation, "")
        state.federation = self.cfg.federation
        self.store.save(state)
        if state.last_submitted_round is not None:
            log.info("resuming: last submitted round %d (run %s)", state.last_submitted_round,
                     state.run_id or "unnamed")
        if state.outbox_pending:
            log.info("the update of round %d is stored but was not acknowledged: it is sent once more when the "
                     "round message arrives", state.outbox_round)
        return state

    def _load_data(self) -> Tuple[LocalData, LocalData]:
        """The validation split, then --shots per class; unreadable images are left out with a warning."""
        cfg, manifest = self.cfg, self.manifest
        samples = load_dataset(cfg.data, list(manifest.classes))
        if not samples:
            raise DatasetError(f"no images for the bundle's classes under {cfg.data}")
        train, val = split_local(samples, cfg.val_fraction, cfg.shots, cfg.seed)
        paths = [s.path for s in train + val]
        if manifest.needs_image_encoder:  # text mode: image features once per image, cached on disk
            feats, bad = self._features(paths)
        else:  # pixels are decoded batch by batch while training: check once that they decode
            feats, bad = None, self._check_decodable(paths)
        report_unreadable(paths, bad)
        train, val = _without(train, bad, 0), _without(val, bad, len(train))
        if not train:
            raise DatasetError(f"none of the training images under {cfg.data} can be read")
        log.info("data %s: %d training and %d validation images%s", cfg.data, len(train), len(val),
                 f" (--shots {cfg.shots}: at most {cfg.shots} per class for training)" if cfg.shots else "")
        if feats is None:
            return _pixel_data(train, manifest), _pixel_data(val, manifest)
        return (LocalData(_labels(train), features=feats[: len(train)]),
                LocalData(_labels(val), features=feats[len(train):]))

    def _features(self, paths: List[Path]) -> Tuple[np.ndarray, Dict[int, str]]:
        """Features of the readable images, through the cache (pruned of other models' entries first)."""
        cache = FeatureCache(self.store.dir / "features.sqlite")
        try:
            dropped = cache.prune(self.manifest.model_id)
            if dropped:
                log.info("feature cache: dropped %d entries of other models", dropped)
            return readable_image_features(
                self.bundle, paths, cache, batch_size=self.cfg.feature_batch_size, threads=self.cfg.threads,
                providers=self.cfg.providers, progress_every_s=self.cfg.progress_every_s,
            )
        finally:
            cache.close()

    def _check_decodable(self, paths: List[Path]) -> Dict[int, str]:
        log.info("checking that the %d images decode", len(paths))
        meter = ProgressMeter("decode check", len(paths), self.cfg.progress_every_s)
        return unreadable_images(paths, progress=lambda done, total: meter.update(done))

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
                      self.backend, time.time())

    def publish_status(self, state: str, error: Optional[str] = None) -> None:
        self.client.publish(self.topics.status(self.cfg.client_id), self._status(state, error).to_json(),
                            qos=QOS, retain=True)

    def _say_once(self, key: str, level: int, msg: str, *args) -> bool:
        """Log a message once per process; True the first time."""
        if key in self._said:
            return False
        self._said.add(key)
        log.log(level, msg, *args)
        return True

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

    def _resend_outbox(self) -> None:
        """After a restart: send the stored, unacknowledged update once (never beside one in flight)."""
        if not self._resend_pending or self._inflight is not None:
            return
        self._resend_pending = False
        s = self.state
        blob = self.store.outbox() if s.outbox_pending else None
        if blob is None:
            if s.outbox_pending:
                log.warning("the update of round %d is recorded but its file is missing: not re-sent", s.outbox_round)
            return
        log.info("re-sending the stored update of round %d (not acknowledged before a restart)", s.outbox_round)
        self._publish_update(s.outbox_round, blob)

    # -- message handling (main thread) ------------------------------------------------------
    def handle(self, kind: str, payload: bytes) -> None:
        if kind == "connected":
            self.publish_status("online")
        elif kind == "global":
            self._handle_global(payload)
        elif kind == "round":
            self._handle_round(payload)

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

    def _handle_round(self, payload: bytes) -> None:
        newer = newer_protocol(payload)
        if newer is not None:
            self.round = None
            reason = f"round message of protocol {newer}, newer than this agent's {PROTOCOL_VERSION}"
            if self._say_once(f"protocol-{newer}", logging.ERROR, "refused a %s: upgrade flora-agent; "
                              "waiting for a round message it understands", reason):
                self.publish_status("error", f"refused {reason}")
            return
        try:
            announcement = RoundAnnouncement.from_json(payload)
        except ProtocolError as exc:
            log.warning("ignored a malformed round message: %s", exc)
            return
        self._enter_run(announcement.run_id)
        self.round = announcement
        self._resend_outbox()

    def _enter_run(self, run_id: str) -> None:
        """A round of another run (a federation started afresh) starts a fresh record of submitted
        rounds; an empty run_id (an older aggregator) keeps the record as it is."""
        s = self.state
        if not run_id or run_id == s.run_id:
            return
        if s.last_submitted_round is not None or s.outbox_pending:
            log.warning("federation run %s (the record was for run %s): forgetting that rounds up to %s were "
                        "submitted%s", run_id, s.run_id or "unnamed", s.last_submitted_round,
                        f", dropping the unsent update of round {s.outbox_round}" if s.outbox_pending else "")
        else:
            log.info("federation run %s", run_id)
        self.store.start_run(s, self.cfg.federation, run_id)
        self._resend_pending = False
        self._inflight = None

    def maybe_train(self) -> None:
        r = self.round
        if r is None:
            return
        tag = f"{r.run_id}/{r.round}"
        if r.model_id != self.manifest.model_id:
            self._say_once(f"model-{tag}", logging.ERROR,
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
            self._say_once(f"skip-{tag}", logging.INFO, "round %d does not ask this client", r.round)
            return
        if self.state.submitted(r.round):
            self._say_once(f"done-{tag}", logging.INFO, "round %d was already submitted", r.round)
            return
        if (r.run_id, r.round) in self._failed:
            self._say_once(f"failed-{tag}", logging.INFO, "round %d failed in this process: not retrying it; "
                           "waiting for the next round", r.round)
            return
        if self.global_sha != r.global_sha256:
            self._say_once(f"wait-{tag}-{self.global_sha}", logging.INFO,
                           "round %d: waiting for its global adapter", r.round)
            return
        try:
            self.train(r)
        except Stopped:
            raise
        except Exception as exc:  # a round's failure must not stop the agent (systemd would loop on it)
            self._round_failed(r, exc)

    def _round_failed(self, r: RoundAnnouncement, exc: Exception) -> None:
        """Log, publish a retained `error` status, never retry this round in this process."""
        self._failed.add((r.run_id, r.round))
        if isinstance(exc, (TrainerError, ImageError)):
            log.error("round %d failed, not submitted: %s", r.round, exc)
        else:
            log.exception("round %d failed, not submitted: %s", r.round, exc)
        self.publish_status("error", f"round {r.round} failed: {type(exc).__name__}: {exc}")
        self._recover_trainer()

    def _recover_trainer(self) -> None:
        """Fresh optimizer state after a failed round: a non-finite step may have poisoned AdamW's moments,
        and ort-training cannot reset them, so its trainer is reopened (the weights come from the next global)."""
        reset = getattr(self.trainer, "reset_optimizer", None)
        if callable(reset):
            reset()
            return
        name = self.trainer.name
        del self.trainer  # free the old session before the new one is built
        self.trainer = open_trainer(self.bundle, name, threads=self.cfg.threads, providers=self.cfg.providers)
        log.info("reopened the %s trainer after the failed round", name)

    def _apply_global(self) -> None:
        """Load the round's global adapter into the live session and persist it as the last applied."""
        assert self.global_adapter is not None and self.global_blob is not None and self.global_sha is not None
        self.trainer.set_adapter(self.global_adapter.as_float32())  # into the live session
        self.store.record_global(self.state, self.global_blob, self.global_adapter.meta.round, self.global_sha)

    def train(self, r: RoundAnnouncement) -> None:
        cfg = r.config
        log.info("round %d: training %d epochs, lr %g, batch %d on %d images", r.round, cfg.epochs, cfg.lr,
                 cfg.batch_size, len(self.train_data))
        self.publish_status("training")
        self._apply_global()
        self.trainer.set_lr(cfg.lr)
        self.trainer.set_weight_decay(cfg.weight_decay)
        for warning in round_config_warnings(cfg, self.manifest, self.trainer.name):
            log.warning(warning)
        result = train_round(
            self.trainer, self.train_data, epochs=cfg.epochs, batch_size=cfg.batch_size,
            seed=self.cfg.seed * 100003 + r.round, progress=lambda line: log.info("round %d: %s", r.round, line),
            progress_every_s=self.cfg.progress_every_s, should_stop=self.stop_event.is_set,
        )
        val = evaluate(self.trainer, self.val_data, eval_batch_size(self.manifest.input_kind, cfg.batch_size))
        blob = adapter_blob.encode(
            self.trainer.get_adapter(), model_id=self.manifest.model_id, round=r.round, kind="update",
            dtype="float16" if self.cfg.fp16_updates else "float32", client_id=self.cfg.client_id,
            num_samples=len(self.train_data),
        )
        self.store.stash_update(self.state, r.round, blob)  # from here on this round counts as submitted
        sent = self._publish_update(r.round, blob)
        self._publish_metrics(r, result, val, len(blob))
        log.info("round %d: sent update (%d bytes%s): train loss %.4f acc %.3f, val acc %s, %.1f s, "
                 "%.1f ms/step, peak RSS %.0f MiB", r.round, len(blob),
                 "" if sent else ", not acknowledged yet: paho re-sends it on reconnect", result.loss,
                 result.train_accuracy, f"{val.accuracy:.3f}" if val else "n/a", result.wall_time_s,
                 1e3 * result.step_time_s, result.peak_rss_mb)
        self.publish_status("idle")

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

    def stop(self) -> None:
        self.stop_event.set()
