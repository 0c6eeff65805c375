"""What a running aggregator shows its operator: the devices it hears from, which of them are in error, the
rounds so far, and (with `--http`) live dashboard snapshots.

The aggregator's main thread feeds it status and metrics messages (already parsed) and closed rounds, and calls
`tick` from its event loop; `tick` saves devices.json (for `status --clients` and `dashboard --state-dir`) and
publishes a snapshot, each throttled, so a fleet's chatter costs no more than one write every few seconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Mapping, Optional

from flora.edge.protocol import Metrics, Status

from .checkpoint import AggregatorState, Checkpoint
from .dashboard.server import Snapshots
from .dashboard.snapshot import ROUND_FIELDS, FederationInfo, build_snapshot
from .devices import METRIC_FIELDS, DeviceRegistry
from .rounds import ClientError, RoundRecord

log = logging.getLogger("flora.aggregator")

SAVE_EVERY_S = 5.0
#: A snapshot at most this often; a large fleet's snapshot costs more to build (about 30 ms per 1,000 devices),
#: so it is built less often: one per second per 1,000 devices keeps it near 3 % of the main thread.
SNAPSHOT_EVERY_S = 0.5
SNAPSHOT_DEVICES_PER_S = 1000


class Watch:
    """Devices, errors, round points and snapshots of one federation (see the module docstring)."""

    def __init__(self, checkpoint: Checkpoint, info: FederationInfo, snapshots: Optional[Snapshots] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.checkpoint = checkpoint
        self.info = info
        self.snapshots = snapshots
        self.clock = clock
        self.devices = DeviceRegistry()
        self.errors: Dict[str, ClientError] = {}  # clients whose latest status is `error`
        self.points: List[Dict[str, Any]] = []  # the history rows, reduced to what the views show
        self._saved_version = 0
        self._next_save = 0.0
        self._next_snapshot = 0.0

    def load(self) -> None:
        """The devices and rounds a previous run of this state dir recorded."""
        saved = self.checkpoint.load_devices()
        if saved:
            self.devices = DeviceRegistry.from_json(saved)
        self._saved_version = self.devices.version
        self.points = [_slim(row) for row in self.checkpoint.history()]

    # -- messages -------------------------------------------------------------------------------
    def status(self, client: str, status: Optional[Status]) -> None:
        """A status message (None: the retained status was cleared, the device retired)."""
        if status is None:
            self.devices.forget(client)
            self.errors.pop(client, None)
            return
        code = getattr(status, "error_code", None)
        self.devices.status(client, status.state, self.clock(), round=status.round, backend=status.backend,
                            num_samples=status.num_samples, last_error=status.last_error, error_code=code)
        if status.state == "error":
            self.errors[client] = ClientError(status.round, code, status.last_error)
        else:
            self.errors.pop(client, None)

    def metrics(self, client: str, metrics: Metrics) -> None:
        self.devices.metrics(client, self.clock(), {k: getattr(metrics, k, None) for k in (*METRIC_FIELDS,
                                                                                           "backend")})

    def round_closed(self, row: Mapping[str, Any]) -> None:
        self.points.append(_slim(row))
        self._next_snapshot = 0.0  # show it now
        self._next_save = 0.0

    # -- the throttled outputs --------------------------------------------------------------------
    def tick(self, state: Optional[AggregatorState], current: Optional[RoundRecord], force: bool = False) -> None:
        """Save devices.json when it changed (every SAVE_EVERY_S at most) and publish a snapshot (when a
        dashboard listens); `force` does both now (at shutdown)."""
        now = time.monotonic()
        if (force or now >= self._next_save) and self.devices.version != self._saved_version:
            try:
                self.checkpoint.save_devices(self.devices.to_json())
                self._saved_version = self.devices.version
            except OSError as exc:  # the operator's view must never stop the federation
                log.warning("could not save the device list: %s", exc)
            self._next_save = now + SAVE_EVERY_S
        if self.snapshots is not None and (force or now >= self._next_snapshot):
            self.snapshots.publish(self.snapshot(state, current))
            self._next_snapshot = now + max(SNAPSHOT_EVERY_S, len(self.devices) / SNAPSHOT_DEVICES_PER_S)

    def snapshot(self, state: Optional[AggregatorState], current: Optional[RoundRecord]) -> Dict[str, Any]:
        return build_snapshot(asdict(state) if state is not None else None, self.points,
                              current.to_json() if current is not None else None, self.devices.rows(), self.info,
                              self.clock())


def _slim(row: Mapping[str, Any]) -> Dict[str, Any]:
    """A history row without its per-client detail (what a snapshot needs, flat in the number of clients)."""
    slim = {k: row[k] for k in ROUND_FIELDS if k in row}
    slim["rejection_counts"] = dict(row.get("rejection_counts") or {})
    return slim
