"""`flora-aggregator --mode async`: buffered asynchronous rounds (FedBuff) over the aggregator's MQTT and disk.

The decisions are `broker.fedbuff` (pure); this is its I/O: the same transport, validation, journal,
group commit and checkpoints as synchronous rounds. Each global is a *version* (the protocol's `round`);
every online agent may train from the newest version it holds and send an update tagged with it. Each
valid update is rebased onto the current global (its staleness-weighted delta from its own base version)
and folded by the strategy; the K-th closes the buffer: the next version is committed, published and
announced. The buffer's updates are journaled before they are acknowledged (key `client@base`, replayed
in arrival order on restart), the accepted (client, base version) pairs of the window are checkpointed
with each version, and the last S + 1 globals stay on disk: a restart resumes the buffer exactly.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional

import numpy as np

from flora.edge import adapter
from flora.edge.fileio import sha256_bytes
from flora.edge.protocol import MODE_ASYNC, ROUND_TRAINING, Metrics, ProtocolError, RoundAnnouncement

from .aggregator import METRIC_FIELDS, SNAPSHOT_EVERY_S, Aggregator, AggregatorConfig
from .checkpoint import METRICS, UPDATE, apply_record, global_file_name
from .fedbuff import CLOSE, BufferConfig, BufferRecord, FedBuff, pair_key, split_pair
from .influence import OVER_DECLARED
from .rounds import NoRoundUpdates
from .strategies import StrategyFull
from .validation import STRATEGY_FULL, Rejected, RoundView, validate_update

if TYPE_CHECKING:
    from paho.mqtt.client import Client as MqttClient

log = logging.getLogger("flora.aggregator")

ASYNC_STATE = "async"  # the key of the async bookkeeping in state.json's `extra`


class AsyncAggregator(Aggregator):
    """The aggregator in buffered asynchronous mode (`cfg.buffer`); see the module docstring."""

    def __init__(self, cfg: AggregatorConfig, client: MqttClient, clock: Callable[[], float] = time.time) -> None:
        super().__init__(cfg, client, clock)
        self.buffer: BufferConfig = cfg.buffer
        self.fedbuff = FedBuff(self.buffer, cfg.round_timeout_s, clock)
        self.layout = adapter.layout_of(tuple(self.manifest.trainable))
        self.current: Optional[BufferRecord] = None  # type: ignore[assignment]

    # -- state -------------------------------------------------------------------------------------
    def _restore_open_round(self) -> None:
        """Load the window of globals and the accepted pairs, then resume the open buffer (or wait to open one)."""
        assert self.state is not None
        version = self.state.round
        older = []
        for v in range(max(version - self.buffer.max_staleness, 0), version):
            blob = self.checkpoint.load_global(v)
            if blob is not None:  # a base no longer on disk: its updates are rejected as stale
                older.append((v, self._flat(adapter.decode(blob, self.manifest.trainable).tensors)))
        self.fedbuff.start(version, self._flat(self.global_tensors), older)
        saved_pairs = self.state.extra.get(ASYNC_STATE, {}).get("seen", {})
        self.fedbuff.seen = {int(b): set(cs) for b, cs in saved_pairs.items() if int(b) >= self.fedbuff.oldest_base}
        saved = self.checkpoint.load_open_round(version)
        if saved is not None:
            self.checkpoint.clear_no_round(version)
            offset = int(saved.pop("journal_offset", 0) or 0)
            rec = self.fedbuff.resume(BufferRecord.from_json(saved))
            rec.accepted, rec.bytes_received, rec.first_update_at = [], 0, None  # rebuilt from the journal
            self._begin(rec, offset)
            return
        pending = self.checkpoint.load_no_round(version)
        self.no_round = NoRoundUpdates.from_json(pending) if pending is not None else None

    def _flat(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        if isinstance(tensors, adapter.FlatTensors) and tensors.layout is self.layout:
            return tensors.flat
        return np.concatenate([np.ravel(tensors[name]) for name, _, _, _ in self.layout.entries])

    # -- the buffer ------------------------------------------------------------------------------------
    def _announcement(self, state: str, rec: Optional[BufferRecord]) -> RoundAnnouncement:  # type: ignore[override]
        assert self.state is not None
        return RoundAnnouncement(
            round=self.state.round, model_id=self.manifest.model_id, state=state, config=self.cfg.train,
            clients="all", deadline=rec.deadline if rec is not None else self.clock(),
            global_sha256=sha256_bytes(self.global_blob), total_rounds=self.state.rounds_total,
            run_id=self.state.run_id, mode=MODE_ASYNC, buffer=self.buffer.buffer,
            max_staleness=self.buffer.max_staleness,
        )

    def _open_round(self, announce: bool = True) -> None:
        rec = self.fedbuff.open()
        if self.no_round is not None and self.no_round.round == rec.version:
            self.no_round.merge_into(rec)  # type: ignore[arg-type]
        self._begin(rec)
        self.checkpoint.clear_no_round(rec.version)  # after round.json holds them
        self.no_round = None
        if announce:
            self._announce(rec)  # type: ignore[arg-type]
        log.info("version %d of %d open: buffer of %d update(s), staleness %s up to %d version(s), server lr %g",
                 rec.version, self.state.rounds_total, self.buffer.buffer, self.buffer.staleness.describe,
                 self.buffer.max_staleness, self.buffer.server_lr)

    def _begin(self, rec: BufferRecord, journal_offset: int = 0) -> None:  # type: ignore[override]
        """Start the buffer; after a restart, re-fold its journaled updates in arrival order."""
        self.current = rec
        self.strategy.begin_round(self.manifest.trainable, self.global_tensors)
        self.strategy.set_round_size(self.buffer.buffer)
        oldest = self.fedbuff.oldest_base  # redeliveries are recognised for the bases still in the window
        self._digests = {k: v for k, v in self._digests.items() if split_pair(k)[1] >= oldest}
        restored = 0
        for entry in self.checkpoint.journaled(rec.version):
            if entry.kind == UPDATE:
                client, _ = split_pair(entry.key)
                if self._fold(client, entry.payload, spool=False):
                    restored += 1
                else:
                    self.checkpoint.unspool(rec.version, entry.key)
            elif entry.offset >= journal_offset:
                apply_record(rec, entry)
        self._save_round(rec)  # type: ignore[arg-type]
        if restored:
            log.info("version %d: %d update(s) restored from the spool", rec.version, restored)

    def _fold(self, client: str, blob: bytes, spool: bool = True) -> bool:
        rec = self.current
        assert rec is not None
        view = RoundView(rec.version, None, frozenset(), admit=self.fedbuff.admit)
        try:
            update = validate_update(blob, client, self.manifest, view, self.max_bytes, self.cfg.max_num_samples)
            base, num_samples = update.meta.round, int(update.meta.num_samples or 0)
            over = self._over_declared(client, num_samples) if spool else None  # a replay was checked on arrival
            if over is not None:
                return self._reject(rec, client, OVER_DECLARED, over, len(blob), save=spool)  # type: ignore
            weight = self.fedbuff.admit(client, base)
            rebased = self.fedbuff.rebase(self._flat(update.tensors), base, weight)
            self.strategy.accumulate(adapter.FlatTensors(rebased, self.layout), num_samples)
        except Rejected as why:
            if why.reason == "duplicate" and self._redelivered(pair_key(client, _claimed_base(blob)), blob):
                return False
            return self._reject(rec, client, why.reason, why.detail, len(blob), save=spool)  # type: ignore[arg-type]
        except StrategyFull as exc:  # a strategy that keeps every update holds as many as it may
            return self._reject(rec, client, STRATEGY_FULL, str(exc), len(blob), save=spool)  # type: ignore
        except ValueError as exc:
            return self._reject(rec, client, "bad-num-samples", str(exc), len(blob), save=spool)  # type: ignore
        if spool:
            self.checkpoint.spool(rec.version, pair_key(client, base), blob)
        self._digests[pair_key(client, base)] = sha256_bytes(blob)
        self.fedbuff.accept(rec, client, base, num_samples, weight, len(blob))
        log.info("version %d: accepted update from %s (base %d, staleness %d, weight %.3f, %d samples); %d of %d",
                 rec.version, client, base, rec.version - base, weight, num_samples, rec.count, self.buffer.buffer)
        return True

    def _buffer_full(self) -> bool:
        return self.current is not None and self.current.count >= self.buffer.buffer

    def _handle_metrics(self, client: str, payload: bytes) -> None:
        """Metrics of an update in the buffer (an agent's metrics name the base version it trained from)."""
        try:
            metrics = Metrics.from_json(payload)
        except ProtocolError as exc:
            log.warning("ignored malformed metrics from %s: %s", client, exc)
            return
        rec = self.current
        key = pair_key(client, metrics.round) if isinstance(metrics.round, int) else ""
        if rec is None or metrics.client_id != client or key not in rec.reported:
            return
        rec.metrics[key] = {k: getattr(metrics, k, None) for k in METRIC_FIELDS}
        self._journal(rec, METRICS, key, rec.metrics[key])  # type: ignore[arg-type]

    def _tick(self) -> None:
        rec = self.current
        assert rec is not None
        if self._snapshot_dirty and time.monotonic() - self._snapshot_at >= SNAPSHOT_EVERY_S:
            self._save_round(rec)  # type: ignore[arg-type]
        if self.fedbuff.step(rec) == CLOSE:
            self._close_round()
        elif self.fedbuff.overdue(rec):
            log.warning("version %d: %d of %d update(s) at the deadline, fewer than the %d needed to publish early; "
                        "waiting %.0f s more", rec.version, rec.count, self.buffer.buffer, self.buffer.min_updates,
                        self.cfg.round_timeout_s)
            self._save_round(rec)  # type: ignore[arg-type]
            self._announce(rec)  # type: ignore[arg-type]

    def _close_round(self) -> None:
        rec = self.current
        assert rec is not None and self.state is not None
        try:
            average = self.strategy.finalize()
        except ValueError as exc:
            self._fail_round(rec, f"the {self.strategy.name} aggregate cannot be computed: {exc}")  # type: ignore
            return
        if average is None:
            raise RuntimeError(f"version {rec.version} closed without updates")
        new_flat = self.fedbuff.next_global(self._flat(average))
        new = self.layout.split(new_flat)
        bad = adapter.find_non_finite(new)
        if bad is not None:
            self._fail_round(rec, f"the async aggregate of tensor {bad} is not finite")  # type: ignore[arg-type]
            return
        row = self._history_row(rec, new)  # type: ignore[arg-type]
        self.fedbuff.advance(new_flat)
        self._commit(rec, new, row)  # type: ignore[arg-type]
        log.info("version %d closed: %d update(s) (staleness mean %.2f, max %d), %d rejected, %.1f s%s; version %d "
                 "published", rec.version, rec.count, row["staleness"]["mean"], row["staleness"]["max"],
                 rec.num_rejected, row["wall_time_s"],
                 f", test accuracy {row['test_accuracy']:.4f}" if isinstance(row.get("test_accuracy"), float) else "",
                 rec.version + 1)

    def _fail_round(self, rec: BufferRecord, why: str) -> None:  # type: ignore[override]
        log.error("version %d FAILED: %s; its %d update(s) are discarded, the next version is the same global",
                  rec.version, why, rec.count)
        row = self._history_row(rec, None)
        row["failed"] = why
        self.fedbuff.advance(self._flat(self.global_tensors))
        self._commit(rec, self.global_tensors, row)  # type: ignore[arg-type]

    def _commit(self, rec: BufferRecord, tensors: Dict[str, np.ndarray], row: Dict[str, Any]) -> None:  # type: ignore
        """Checkpoint the next version with the accepted pairs still in the window, keep S + 1 globals, publish."""
        assert self.state is not None
        next_version = rec.version + 1
        blob = adapter.encode(tensors, model_id=self.manifest.model_id, round=next_version, kind="global")
        window = range(max(next_version - self.buffer.max_staleness, 0), next_version + 1)
        self.state.extra[ASYNC_STATE] = {"seen": self.fedbuff.seen_json(),
                                         "window": [global_file_name(v) for v in window]}  # kept on load
        self.state = self.checkpoint.commit(self.state, next_version, blob, row,
                                            next_version >= self.state.rounds_total,
                                            keep_globals=self.buffer.max_staleness + 1)
        self.global_blob, self.global_tensors = blob, tensors
        self.current = None
        if self.state.done:
            self._publish(self.topics.global_, blob, retain=True)
            return
        # the next buffer opens before the new global goes out: the updates that arrive meanwhile (from older
        # bases) are folded into it, never left without a buffer
        self._open_round(announce=False)
        # not waited for: a version may close in the middle of handling a batch (the broker still gets both in
        # order; paho re-sends them after a reconnect, and a restart re-publishes the checkpointed global)
        self._publish(self.topics.global_, blob, retain=True, wait=0.0)
        self._publish(self.topics.round, self._announcement(ROUND_TRAINING, self.current).to_json(), retain=True,
                      wait=0.0)

    def _history_row(self, rec: BufferRecord, new: Optional[Dict[str, np.ndarray]]) -> Dict[str, Any]:  # type: ignore
        now = self.clock()
        stale = [rec.version - b for _, b, _, _ in rec.accepted]
        accs = [m["accuracy"] for m in rec.metrics.values() if isinstance(m.get("accuracy"), (int, float))]
        losses = [m["loss"] for m in rec.metrics.values() if isinstance(m.get("loss"), (int, float))]
        row: Dict[str, Any] = {
            "round": rec.version, "mode": MODE_ASYNC, "strategy": self.strategy.name,
            "buffer": self.buffer.buffer, "max_staleness": self.buffer.max_staleness,
            "staleness_function": self.buffer.staleness.describe, "server_lr": self.buffer.server_lr,
            "accepted": [list(a) for a in rec.accepted], "reported": dict(sorted(rec.reported.items())),
            "asked": [], "num_asked": rec.count, "num_reported": rec.count, "num_rejected": rec.num_rejected,
            "samples": rec.samples, "rejected": rec.rejected,
            "rejection_counts": dict(sorted(rec.rejection_counts.items())),
            "staleness": {"mean": float(np.mean(stale)) if stale else 0.0, "max": max(stale, default=0),
                          "histogram": {str(s): stale.count(s) for s in sorted(set(stale))}},
            "bytes_received": rec.bytes_received, "bytes_rejected": rec.bytes_rejected,
            "global_bytes": len(self.global_blob), "bytes_sent": len(self.global_blob) * len(self.online),
            "extensions": 0, "started_at": rec.started_at, "closed_at": now,
            "wall_time_s": round(now - rec.started_at, 3), "metrics": dict(sorted(rec.metrics.items())),
            "mean_client_accuracy": float(np.mean(accs)) if accs else None,
            "mean_client_loss": float(np.mean(losses)) if losses else None,
        }
        if self.cfg.on_round_closed is not None and new is not None:
            row.update(self._call_hook(f"version {rec.version}: on_round_closed", self.cfg.on_round_closed,
                                       rec.version, new))
        return row


def _claimed_base(blob: bytes) -> int:
    try:
        return int(adapter.read_header(blob)[1].get("round", -1))
    except (adapter.AdapterError, ValueError):
        return -1


def make_aggregator(cfg: AggregatorConfig, clock: Callable[[], float] = time.time) -> Aggregator:
    """The aggregator for `cfg.mode` (synchronous rounds, or buffered asynchronous ones) with a paho client."""
    return (AsyncAggregator if cfg.mode == MODE_ASYNC else Aggregator).open(cfg, clock)

