"""What the aggregator knows of each device: its latest status, its last metrics, when it was last heard from.

A pure record (no MQTT, no clock reads: the caller passes `now`), fed by the aggregator's main thread from
`status/<id>` and `metrics/<id>` messages that already passed the protocol's checks. It backs the operator's
views (`status --clients`, the dashboard, /metrics) and is saved to the state dir so they also work on a copy
of it. The number of devices kept is bounded: past `max_devices`, the longest-unheard device is forgotten (O(1)),
so a flood of made-up client ids on an open broker cannot grow it without end.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, Iterator, List, Mapping, Optional

#: Metric fields a device row carries from the client's latest `metrics` message.
METRIC_FIELDS = ("round", "loss", "accuracy", "samples", "step_time_s", "wall_time_s", "peak_rss_mb")
MAX_DEVICES = 100_000
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class Device:
    """One device's row: identity, latest status, latest metrics."""

    client_id: str
    state: str = "unknown"
    last_seen: Optional[float] = None  # aggregator time of the last status or metrics message
    status_round: Optional[int] = None
    backend: Optional[str] = None
    num_samples: Optional[int] = None  # as the device declared it in its status
    last_error: Optional[str] = None
    error_code: Optional[str] = None
    metrics_round: Optional[int] = None
    loss: Optional[float] = None
    accuracy: Optional[float] = None
    samples: Optional[int] = None
    step_time_s: Optional[float] = None
    wall_time_s: Optional[float] = None
    peak_rss_mb: Optional[float] = None

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Device:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class DeviceRegistry:
    """Devices by client id, least recently heard first; see the module docstring."""

    def __init__(self, max_devices: int = MAX_DEVICES) -> None:
        if max_devices < 1:
            raise ValueError(f"max_devices must be >= 1, got {max_devices}")
        self.max_devices = max_devices
        self._devices: OrderedDict[str, Device] = OrderedDict()
        self.version = 0  # bumped on every change: lets readers skip unchanged snapshots

    def __len__(self) -> int:
        return len(self._devices)

    def __iter__(self) -> Iterator[Device]:
        return iter(self._devices.values())

    def get(self, client_id: str) -> Optional[Device]:
        return self._devices.get(client_id)

    def status(self, client_id: str, state: str, now: float, *, round: Optional[int] = None,
               backend: Optional[str] = None, num_samples: Optional[int] = None, last_error: Optional[str] = None,
               error_code: Optional[str] = None) -> Device:
        """Record a status message (the latest one replaces the previous status fields)."""
        old = self._devices.get(client_id) or Device(client_id)
        new = replace(old, state=state, last_seen=now, status_round=round, backend=backend or old.backend,
                      num_samples=num_samples, last_error=_short(last_error), error_code=error_code)
        return self._put(new)

    def metrics(self, client_id: str, now: float, values: Mapping[str, Any]) -> Device:
        """Record a metrics message (`values` holds METRIC_FIELDS; others are ignored)."""
        old = self._devices.get(client_id) or Device(client_id)
        new = replace(old, last_seen=now, metrics_round=values.get("round"), loss=values.get("loss"),
                      accuracy=values.get("accuracy"), samples=values.get("samples"),
                      step_time_s=values.get("step_time_s"), wall_time_s=values.get("wall_time_s"),
                      peak_rss_mb=values.get("peak_rss_mb"), backend=values.get("backend") or old.backend)
        return self._put(new)

    def forget(self, client_id: str) -> bool:
        """A device whose retained status was cleared (retired); True if it was known."""
        if self._devices.pop(client_id, None) is None:
            return False
        self.version += 1
        return True

    def by_state(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for d in self._devices.values():
            counts[d.state] = counts.get(d.state, 0) + 1
        return dict(sorted(counts.items()))

    def rows(self) -> List[Dict[str, Any]]:
        return [d.to_json() for d in sorted(self._devices.values(), key=lambda d: d.client_id)]

    def to_json(self) -> Dict[str, Any]:
        return {"max_devices": self.max_devices, "devices": self.rows()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DeviceRegistry:
        reg = cls(int(d.get("max_devices", MAX_DEVICES)))
        rows = [Device.from_json(row) for row in d.get("devices", [])]
        for device in sorted(rows, key=lambda r: r.last_seen if r.last_seen is not None else float("-inf")):
            reg._put(device)
        reg.version = 0
        return reg

    def _put(self, device: Device) -> Device:
        if device.client_id not in self._devices and len(self._devices) >= self.max_devices:
            self._devices.popitem(last=False)  # the longest unheard
        self._devices[device.client_id] = device
        self._devices.move_to_end(device.client_id)
        self.version += 1
        return device


def _short(text: Optional[str]) -> Optional[str]:
    if text is None:
        return None
    text = str(text)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"
