"""/metrics for Prometheus, through `prometheus_client`: every family is computed from the dashboard snapshot, so
a running aggregator and a state dir served by `flora-aggregator dashboard` expose the same metrics."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Mapping, Sequence, Tuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Round duration buckets (s): a round lasts from seconds (a simulation) to the round timeout (minutes).
ROUND_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: Aggregation (fold + commit) buckets (s).
AGGREGATION_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


def histogram(name: str, doc: str, values: Sequence[float], buckets: Sequence[float]) -> HistogramMetricFamily:
    """A histogram family from raw observations (cumulative bucket counts, +Inf last)."""
    counts = [(repr(b), float(sum(1 for v in values if v <= b))) for b in buckets]
    counts.append(("+Inf", float(len(values))))
    return HistogramMetricFamily(name, doc, buckets=counts, sum_value=float(sum(values)))


def families(snap: Mapping[str, Any]) -> Iterator[Metric]:
    """Every metric family of one snapshot."""
    totals: Dict[str, Any] = snap.get("totals") or {}
    points = [p for p in snap.get("points") or () if p.get("rounds_completed", 0) > 0]
    yield CounterMetricFamily("flora_rounds_completed", "Rounds completed (closed with a new global or failed).",
                              value=float(snap.get("rounds_completed") or 0))
    yield CounterMetricFamily("flora_rounds_failed", "Rounds whose aggregate was unusable and was not committed.",
                              value=float(totals.get("rounds_failed") or 0))
    yield GaugeMetricFamily("flora_rounds_total", "Rounds the federation is configured to run.",
                            value=float(snap.get("rounds_total") or 0))
    yield GaugeMetricFamily("flora_done", "1 once the federation has run all its rounds.",
                            value=1.0 if snap.get("phase") == "done" else 0.0)
    current = snap.get("current")
    if current is not None:
        yield GaugeMetricFamily("flora_round", "The open round's number.", value=float(current.get("number") or 0))
        yield GaugeMetricFamily("flora_round_deadline_timestamp_seconds", "Unix time the open round may close.",
                                value=float(current.get("deadline") or 0))
        g = GaugeMetricFamily("flora_round_clients", "Clients of the open round, by role.", labels=["role"])
        for role in ("asked", "reported", "rejected"):
            g.add_metric([role], float(current.get(role) or 0))
        yield g
    yield histogram("flora_round_duration_seconds", "Wall time of each completed round (open to close).",
                    [float(p["wall_time_s"]) for p in points if isinstance(p.get("wall_time_s"), (int, float))],
                    ROUND_BUCKETS)
    yield histogram("flora_aggregation_seconds", "Time to finalize, check and commit each round's aggregate.",
                    [float(p["aggregation_s"]) for p in points if isinstance(p.get("aggregation_s"), (int, float))],
                    AGGREGATION_BUCKETS)
    yield CounterMetricFamily("flora_updates_accepted", "Client updates accepted into an aggregate.",
                              value=float(totals.get("updates_accepted") or 0))
    rejected = CounterMetricFamily("flora_updates_rejected", "Client updates rejected, by reason.", labels=["reason"])
    for reason, n in (snap.get("rejections") or {}).items():
        rejected.add_metric([reason], float(n))
    yield rejected
    yield CounterMetricFamily("flora_bytes_received", "Bytes of accepted updates.", value=float(
        totals.get("bytes_up") or 0), unit="bytes")
    yield CounterMetricFamily("flora_bytes_sent", "Bytes of global adapters sent (global size x clients asked).",
                              value=float(totals.get("bytes_down") or 0), unit="bytes")
    devices = GaugeMetricFamily("flora_devices", "Devices by their latest state.", labels=["state"])
    counts: Dict[str, int] = {}
    for d in snap.get("devices") or ():
        counts[d.get("state") or "unknown"] = counts.get(d.get("state") or "unknown", 0) + 1
    for state, n in sorted(counts.items()):
        devices.add_metric([state], float(n))
    yield devices
    last = next((p for p in reversed(points) if isinstance(p.get("test_accuracy"), (int, float))), None)
    if last is not None:
        yield GaugeMetricFamily("flora_test_accuracy", "Held-out test accuracy of the latest evaluated global.",
                                value=float(last["test_accuracy"]))
    if isinstance(snap.get("epsilon"), (int, float)):
        yield GaugeMetricFamily("flora_privacy_epsilon", "Differential-privacy epsilon spent so far (at the run's "
                                "delta).", value=float(snap["epsilon"]))


class SnapshotCollector:
    """A prometheus_client collector over a snapshot source (`latest()` -> (version, snapshot))."""

    def __init__(self, latest: Callable[[], Tuple[int, Mapping[str, Any]]]) -> None:
        self._latest = latest

    def collect(self) -> Iterator[Metric]:
        _, snap = self._latest()
        return families(snap)


def metrics_endpoint(latest: Callable[[], Tuple[int, Mapping[str, Any]]]) -> Callable[[], Tuple[bytes, str]]:
    """A function the HTTP server calls for /metrics: (body, content type) in Prometheus' text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(latest))
    return lambda: (generate_latest(registry), CONTENT_TYPE_LATEST)
