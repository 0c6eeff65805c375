"""`flora-aggregator --role site --upstream URL`: a site aggregator between a site's devices and the root.

    devices -> site broker + site aggregator -> (mosquitto bridge) -> root broker + root aggregator

Upstream the site is one client of the root federation (`--upstream-federation`, client id `--site-id`):
it publishes a retained `online` status (its last will says `offline`), takes the root's `round` and
`global`, and for each root round that asks it, runs a synchronous round of its own federation on the
site broker: the root's global (the same bytes) and a `round` message asking the site's online devices,
with the root's config, run id and round number. Its devices' updates are validated, journaled and folded
exactly as a root aggregator's (group commit, restart from the journal); when the local round closes
(every asked device reported, or the deadline with --min-clients), the site sends the root one `partial`:
the float64 weighted sum of its devices' updates and their total weight. The root folds partials as it
folds updates, so its global is the flat FedAvg of every device behind every site.

The partial is written to the state dir before it is published and marked sent when the upstream broker
acknowledges it; a restarted site re-sends an unacknowledged partial once (the root drops a copy as a
`duplicate`). A root round that moves on without the site (its quorum/timeout) abandons the local one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from flora.edge import adapter
from flora.edge.errors import ConfigError
from flora.edge.fileio import atomic_write_bytes, sha256_bytes
from flora.edge.mqtt import BrokerConfig, Connection, make_client
from flora.edge.protocol import (
    QOS,
    ROUND_DONE,
    ROUND_TRAINING,
    ProtocolError,
    RoundAnnouncement,
    Status,
    Topics,
    check_id,
)

from .aggregator import Aggregator, AggregatorConfig
from .rounds import RoundRecord

if TYPE_CHECKING:
    from paho.mqtt.client import Client as MqttClient

log = logging.getLogger("flora.aggregator")

SITE_STATE = "site"  # the key of the site's bookkeeping in state.json's `extra`
UP_ROUND, UP_GLOBAL = "up-round", "up-global"


@dataclass(frozen=True)
class Upstream:
    """Where the root federation is reached (directly, or through a bridge on the site broker)."""

    broker: BrokerConfig
    federation: str
    site_id: str

    def __post_init__(self) -> None:
        check_id(self.site_id, "site id")
        check_id(self.federation, "federation name")


class SiteAggregator(Aggregator):
    """A site: synchronous rounds of its own devices, driven by the root's rounds, reported as partials."""

    def __init__(self, cfg: AggregatorConfig, upstream: Upstream, client: MqttClient, up_client: MqttClient,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(cfg, client, clock)
        if not self.strategy.folds_partials:
            raise ConfigError(f"--role site: the {self.strategy.name} strategy cannot make a partial; use fedavg")
        if upstream.federation == cfg.federation and upstream.broker.describe() == cfg.broker.describe():
            raise ConfigError("--role site: the upstream federation and this site's federation share one broker "
                              "and one name; give the site's devices their own --federation")
        self.upstream = upstream
        self.up_topics = Topics(upstream.federation)
        self.up_client = up_client
        self.up_client.on_message = self._on_up_message
        self.up_connection = Connection(upstream.broker, self.up_client, on_connected=self._on_up_connected)
        self.up_round: Optional[RoundAnnouncement] = None
        self.up_global: Optional[bytes] = None
        self._finished = False

    # -- upstream (paho's thread of the upstream client: queue only) ---------------------------------------
    def _on_up_connected(self, client) -> None:
        client.subscribe([(self.up_topics.global_, QOS), (self.up_topics.round, QOS)])
        client.publish(self.up_topics.status(self.upstream.site_id),
                       Status(self.upstream.site_id, "online", ts=time.time()).to_json(), qos=QOS, retain=True)

    def _on_up_message(self, client, userdata, msg) -> None:
        if msg.topic == self.up_topics.round:
            self.events.put((UP_ROUND, "", bytes(msg.payload), None))
        elif msg.topic == self.up_topics.global_:
            self.events.put((UP_GLOBAL, "", bytes(msg.payload), None))

    def _dispatch(self, kind: str, client: str, payload: bytes) -> None:
        if kind == UP_ROUND:
            self._handle_up_round(payload)
        elif kind == UP_GLOBAL:
            self._handle_up_global(payload)
        else:
            super()._dispatch(kind, client, payload)

    def _handle_up_global(self, payload: bytes) -> None:
        try:
            got = adapter.decode(payload, self.manifest.trainable, model_id=self.manifest.model_id,
                                 max_bytes=adapter.max_blob_bytes(self.manifest.trainable), copy=False)
        except adapter.AdapterError as exc:
            log.error("refused the root's global: %s", exc)
            return
        if got.meta.kind in ("global", "initial"):
            self.up_global = payload
            self._follow_root()

    def _handle_up_round(self, payload: bytes) -> None:
        try:
            ann = RoundAnnouncement.from_json(payload)
        except ProtocolError as exc:
            log.warning("ignored a malformed round message from the root: %s", exc)
            return
        if ann.model_id != self.manifest.model_id:
            log.error("the root's round %d is for model %s, this bundle is %s", ann.round, ann.model_id[:16],
                      self.manifest.model_id[:16])
            return
        if ann.is_async:
            log.error("the root runs asynchronous rounds; a site aggregator serves synchronous ones only")
            return
        self.up_round = ann
        self._follow_root()

    # -- following the root's rounds ------------------------------------------------------------------------
    @property
    def _site(self) -> Dict[str, Any]:
        assert self.state is not None
        return self.state.extra.setdefault(SITE_STATE, {"sent": None, "run_id": "", "outbox": None})

    def _follow_root(self) -> None:
        """Open (or abandon) the local round as the root's latest round message says."""
        ann = self.up_round
        if ann is None or self.state is None:
            return
        if ann.state == ROUND_DONE:
            if self.current is not None:
                log.warning("the root is done: local round %d abandoned", self.current.number)
                self._abandon()
            self._finished = True
            return
        if ann.state != ROUND_TRAINING or not ann.asks(self.upstream.site_id):
            return
        site = self._site
        if site["run_id"] != ann.run_id:  # a root run started afresh: forget what was sent to the old one
            site.update(sent=None, run_id=ann.run_id, outbox=None)
            self.checkpoint.save(self.state)
        if site["sent"] is not None and ann.round <= site["sent"]:
            return  # already reported
        if self.current is not None:
            if self.current.number == ann.round:
                return  # the same round, re-announced (an extension at the root)
            log.warning("the root moved on to round %d: local round %d abandoned", ann.round, self.current.number)
            self._abandon()
        if self.up_global is None or sha256_bytes(self.up_global) != ann.global_sha256:
            return  # wait for the root's global of this round
        self._open_site_round(ann)

    def _open_site_round(self, ann: RoundAnnouncement) -> None:
        assert self.state is not None and self.up_global is not None
        self.state.round = ann.round
        self.state.rounds_total = ann.total_rounds
        self.global_blob = self.up_global
        self.global_tensors = adapter.decode(self.up_global, self.manifest.trainable).as_float32()
        saved = self.checkpoint.load_open_round(ann.round)
        if saved is not None:  # the same root round, open here before a restart
            offset = int(saved.pop("journal_offset", 0) or 0)
            self._restore_round(RoundRecord.from_json(saved), offset)
        else:
            self._begin(self.rounds.open(ann.round, self.online))
        self._publish(self.topics.global_, self.global_blob, retain=True)
        self._announce(self.current)
        log.info("site round %d (the root's): asked %d device(s), deadline in %.0f s", ann.round,
                 len(self.current.asked), self.cfg.round_timeout_s)

    def _abandon(self) -> None:
        assert self.current is not None
        self.checkpoint.clear_spool(self.current.number)
        self.current = None

    def _announcement(self, state: str, rec: Optional[RoundRecord]) -> RoundAnnouncement:
        ann = self.up_round
        assert ann is not None and self.state is not None
        return RoundAnnouncement(
            round=ann.round, model_id=self.manifest.model_id, state=state, config=ann.config,
            clients=sorted(rec.asked) if rec is not None else [],
            deadline=rec.deadline if rec is not None else self.clock(),
            global_sha256=sha256_bytes(self.global_blob), total_rounds=ann.total_rounds, run_id=ann.run_id,
        )

    # -- closing: the partial goes upstream -------------------------------------------------------------------
    def _close_round(self) -> None:
        rec = self.current
        assert rec is not None and self.state is not None
        influence = self._bound_influence(rec)  # the site's share cap and norm bound, over its own devices
        part = self.strategy.partial()
        if part is None and influence.get("refused"):
            log.error("site round %d: every update was refused by the influence bounds: nothing is sent", rec.number)
            self._abandon()
            return
        if part is None:
            raise RuntimeError(f"site round {rec.number} closed without updates")
        weighted_sum, weight = part
        bad = adapter.find_non_finite(weighted_sum)
        if bad is not None:
            log.error("site round %d: the weighted sum of tensor %s is not finite: nothing is sent", rec.number, bad)
            self._abandon()
            return
        blob = adapter.encode(weighted_sum, model_id=self.manifest.model_id, round=rec.number, kind=adapter.PARTIAL,
                              dtype=adapter.PARTIAL_DTYPE, client_id=self.upstream.site_id, num_samples=int(weight),
                              num_updates=len(rec.reported))
        outbox = f"partial-{rec.number:06d}.safetensors"
        atomic_write_bytes(self.checkpoint.dir / outbox, blob)
        row = self._history_row(rec, None)
        row.update(role="site", partial_bytes=len(blob), partial_weight=int(weight))
        if influence:
            row["influence"] = influence
        self._site.update(sent=rec.number, outbox=outbox, outbox_acked=False)
        self.state = self.checkpoint.commit(self.state, rec.number, self.global_blob, row, False)
        self.current = None
        log.info("site round %d closed: %d update(s), %d sample(s), %d rejected; partial of %d bytes to the root",
                 rec.number, len(rec.reported), int(weight), rec.num_rejected, len(blob))
        self._send_outbox()

    def _send_outbox(self) -> None:
        """Publish the stored partial upstream (QoS 1) and mark it acknowledged when the broker says so."""
        site = self._site
        name = site.get("outbox")
        if not name or site.get("outbox_acked"):
            return
        try:
            blob = (self.checkpoint.dir / name).read_bytes()
        except OSError:
            log.error("the stored partial %s is missing: not re-sent", name)
            return
        info = self.up_client.publish(self.up_topics.update(self.upstream.site_id), blob, qos=QOS)
        deadline = time.monotonic() + 30.0
        while not info.is_published() and time.monotonic() < deadline and not self.stop_event.is_set():
            self._drain(0.01)
        if info.is_published():
            site["outbox_acked"] = True
            self.checkpoint.save(self.state)
        else:
            log.warning("the partial of round %s is not acknowledged yet; paho re-sends it on reconnecting", name)

    # -- running ---------------------------------------------------------------------------------------------------
    def _resume_or_start(self) -> None:
        """The site's state dir: its record of rounds sent and, mid-round, the journal (resumed when the root
        announces that round again)."""
        loaded = self.checkpoint.load()
        if loaded is None:
            blob = adapter.encode(self.cfg.initial_adapter, model_id=self.manifest.model_id, round=0, kind="global")
            self.state = self.checkpoint.start(self.manifest.model_id, self.cfg.rounds, blob)
        else:
            self.state, blob = loaded
        self.global_blob = blob
        self.global_tensors = adapter.decode(blob, self.manifest.trainable).as_float32()

    def run(self) -> int:
        self.checkpoint.lock()
        try:
            self._resume_or_start()
            self.connection.start()
        except BaseException:
            self.checkpoint.unlock()
            raise
        try:
            # the site joins the root federation once its own devices are there (--wait-for-clients)
            self._wait_for_clients(self.cfg.wait_for_clients, self.cfg.wait_timeout_s)
            self.up_connection.start()
            self._send_outbox()  # a partial stored before a restart and never acknowledged
            while not self.stop_event.is_set() and not self._finished:
                self._drain(0.05)
                if self.current is not None:
                    self._tick()
            if self._finished:
                self._announce_done_locally()
                log.info("the root federation is done")
            return 0
        finally:
            self.stop_event.set()
            self.up_connection.stop()
            self.connection.stop()
            self.checkpoint.unlock()

    def _announce_done_locally(self) -> None:
        if self.up_round is not None:
            self._publish(self.topics.round, self._announcement(ROUND_DONE, None).to_json(), retain=True)


def site_from_args(cfg: AggregatorConfig, upstream_url: Optional[str], upstream_federation: Optional[str],
                   site_id: Optional[str], upstream_broker: Optional[BrokerConfig] = None) -> SiteAggregator:
    if not upstream_url and upstream_broker is None:
        raise ConfigError("--role site needs --upstream mqtt(s)://HOST:PORT (the root's broker, or this site's when "
                          "a bridge carries the root's topics)")
    broker = upstream_broker or BrokerConfig.from_url(upstream_url, username=cfg.broker.username,
                                                      password=cfg.broker.password, ca_file=cfg.broker.ca_file,
                                                      cert_file=cfg.broker.cert_file, key_file=cfg.broker.key_file)
    upstream = Upstream(broker, upstream_federation or cfg.federation, site_id or cfg.client_id)
    return SiteAggregator(cfg, upstream, make_client(cfg.broker, cfg.client_id), upstream_client(upstream))


def upstream_client(upstream: Upstream) -> MqttClient:
    """The site's paho client in the root federation: its last will is a retained `offline` status."""
    topics = Topics(upstream.federation)
    will = Status(upstream.site_id, "offline", ts=time.time()).to_json()
    return make_client(upstream.broker, upstream.site_id, will_topic=topics.status(upstream.site_id),
                       will_payload=will)
