"""`flora-agent --metrics-port PORT`: the agent's own figures for Prometheus (`prometheus_client`), on loopback
unless told otherwise. Updated after every round the agent trains; nothing here blocks the training loop."""

from __future__ import annotations

from typing import Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class AgentMetrics:
    """The gauges and counters of one agent process, in a registry of their own."""

    def __init__(self, client_id: str, backend: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"client_id": client_id, "backend": backend}
        info = Gauge("flora_agent_info", "This agent (value 1).", list(labels), registry=self.registry)
        info.labels(**labels).set(1)
        r = self.registry
        self.step_time = Gauge("flora_agent_step_time_seconds", "Mean optimizer step time of the last round.",
                               registry=r)
        self.round_time = Gauge("flora_agent_round_time_seconds", "Wall time of the last round's training.",
                                registry=r)
        self.samples = Gauge("flora_agent_samples", "Local training samples (the FedAvg weight).", registry=r)
        self.peak_rss = Gauge("flora_agent_peak_rss_bytes", "Peak resident memory of the agent process.", registry=r)
        self.last_round = Gauge("flora_agent_last_round", "The last round this agent trained and submitted.",
                                registry=r)
        self.loss = Gauge("flora_agent_last_loss", "Training loss of the last round.", registry=r)
        self.accuracy = Gauge("flora_agent_last_accuracy", "Local validation accuracy of the last round.", registry=r)
        self.rounds = Counter("flora_agent_rounds", "Rounds trained and submitted by this process.", registry=r)
        self.failures = Counter("flora_agent_round_failures", "Rounds that failed on this device.", registry=r)
        self._server: Optional[Tuple[object, object]] = None

    def record_round(self, round_: int, *, step_time_s: float, wall_time_s: float, samples: int, peak_rss_mb: float,
                     loss: float, accuracy: Optional[float]) -> None:
        self.step_time.set(step_time_s)
        self.round_time.set(wall_time_s)
        self.samples.set(samples)
        self.peak_rss.set(peak_rss_mb * 2 ** 20)
        self.last_round.set(round_)
        self.loss.set(loss)
        if accuracy is not None:
            self.accuracy.set(accuracy)
        self.rounds.inc()

    def record_failure(self) -> None:
        self.failures.inc()

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics in a daemon thread; the port actually bound (0 picks a free one)."""
        started = start_http_server(port, addr=host, registry=self.registry)
        if not isinstance(started, tuple):  # prometheus_client before 0.17 returns nothing
            return port
        self._server = started
        return int(started[0].server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            server = self._server[0]
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
            self._server = None
