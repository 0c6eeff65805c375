"""What the aggregator and the agent show an operator: the device registry fed by real events, devices.json,
error handling per round, the agent's /metrics, and JSON log lines."""

from __future__ import annotations

import io
import json
import logging
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from flora.broker.checkpoint import Checkpoint
from flora.broker.dashboard.server import Snapshots
from flora.edge.logs import fields, setup_logging
from flora.edge.protocol import Status
from flora.edge.synthetic import encode_update, random_adapter

from .fakes import FakeClock, metrics, offer_round, offline_agent, offline_aggregator, status


def error_status(client: str, round_: int, code: str, message: str) -> bytes:
    return Status(client, "error", round_, message, 10, "step", 0.0, code).to_json()


def test_the_aggregator_keeps_a_device_table_and_saves_it_for_status_and_dashboard(tmp_path):
    clock = FakeClock()
    snaps = Snapshots()
    agg = offline_aggregator(tmp_path / "state", clock, rounds=3, snapshots=snaps)
    agg._resume_or_start()
    for c in ("a", "b", "c"):
        agg.handle("status", c, status(c))
    agg._open_round()
    agg.handle("update", "a", encode_update(agg.manifest, random_adapter(agg.manifest, 1), "a", 0, 12))
    agg.handle("metrics", "a", metrics("a", 0, 0.75))
    agg.handle("status", "b", error_status("b", 0, "round-failed", "round 0 failed: non-finite loss"))
    agg.handle("status", "c", b"")  # retired: its retained status was cleared
    agg.watch.tick(agg.state, agg.current, force=True)
    saved = Checkpoint(tmp_path / "state").load_devices()
    rows = {d["client_id"]: d for d in saved["devices"]}
    assert set(rows) == {"a", "b"} and rows["a"]["accuracy"] == 0.75 and rows["a"]["metrics_round"] == 0
    assert rows["b"]["state"] == "error" and rows["b"]["last_error"] == "round 0 failed: non-finite loss"
    snap = snaps.latest()[1]
    assert snap["live"] and snap["phase"] == "open" and snap["current"]["reported"] == 1
    assert {d["client_id"] for d in snap["devices"]} == {"a", "b"}
    assert snap["federation"] == "fed" and snap["strategy"] == "fedavg"
    assert json.loads((tmp_path / "state" / "state.json").read_text())["extra"]["federation"]["min_clients"] == 1


def test_a_round_closes_early_when_the_missing_client_failed_it_and_says_so_once(tmp_path, caplog):
    from flora.broker.rounds import Sampling

    clock = FakeClock()
    agg = offline_aggregator(tmp_path / "state", clock, rounds=3, sampling=Sampling(min_clients=2), round_timeout_s=600,
                             metrics_grace_s=0)
    agg._resume_or_start()
    for c in ("a", "b", "c"):
        agg.handle("status", c, status(c))
    agg._open_round()
    for i, c in enumerate(("a", "b")):
        agg.handle("update", c, encode_update(agg.manifest, random_adapter(agg.manifest, i), c, 0, 10))
    agg._tick()
    assert agg.current is not None and agg.current.number == 0  # c may still report
    agg.handle("status", "c", error_status("c", 0, "round-failed", "round 0 failed: ImageError: truncated"))
    with caplog.at_level(logging.WARNING, logger="flora.aggregator"):
        agg._tick()  # long before the 600 s deadline
    assert agg.current is None and agg.state.round == 1
    said = [r.getMessage() for r in caplog.records if "is in error" in r.getMessage()]
    assert said == ["round 0: c is in error (round-failed), not waiting for it: round 0 failed: ImageError: "
                    "truncated"]
    row = Checkpoint(tmp_path / "state").history()[-1]
    assert row["num_reported"] == 2 and row["aggregation_s"] >= 0


def test_the_agent_serves_its_last_round_on_its_metrics_port(tmp_path):
    agent = offline_agent(tmp_path / "state", metrics_port=0)
    from flora.edge.prometheus import AgentMetrics

    agent.metrics = AgentMetrics("dev-1", agent.trainer.name)
    port = agent.metrics.serve(0)
    try:
        offer_round(agent, 0)
        agent.pump()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as res:
            body = res.read().decode()
    finally:
        agent.metrics.stop()
    samples = {s.name: s.value for fam in text_string_to_metric_families(body) for s in fam.samples}
    assert samples["flora_agent_last_round"] == 0 and samples["flora_agent_rounds_total"] == 1
    assert samples["flora_agent_samples"] == 18 and samples["flora_agent_step_time_seconds"] > 0


def test_json_log_lines_carry_the_structured_fields():
    stream = io.StringIO()
    setup_logging("INFO", "json", stream=stream)
    try:
        log = logging.getLogger("flora.aggregator")
        log.warning("round %d: rejected update from %s", 3, "dev-7", extra=fields("rejected", round=3,
                                                                                 client="dev-7", reason="late"))
        logging.getLogger("flora.agent").info("plain message with \n a newline")
    finally:
        setup_logging("WARNING", "plain")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "round 3: rejected update from dev-7" and first["level"] == "WARNING"
    assert (first["event"], first["round"], first["client"], first["reason"]) == ("rejected", 3, "dev-7", "late")
    assert first["time"].endswith("+00:00") and first["logger"] == "flora.aggregator"
    assert second["event"] == "agent" and "round" not in second and second["message"].endswith("a newline")


def test_the_clis_take_log_format_json(tmp_path, monkeypatch, capsys):
    import flora.broker.cli as cli

    monkeypatch.setattr(cli, "run", lambda args: logging.getLogger("flora.aggregator").info("hello") or 0)
    assert cli.main(["--broker", "mqtt://h", "--log-format", "json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["message"] == "hello" and line["level"] == "INFO"
    setup_logging("WARNING", "plain")


def test_a_device_holding_another_models_bundle_is_not_asked_until_it_is_fixed(tmp_path):
    clock = FakeClock()
    agg = offline_aggregator(tmp_path / "state", clock, rounds=3)
    agg._resume_or_start()
    for c in ("a", "b"):
        agg.handle("status", c, status(c))
    agg.handle("status", "b", error_status("b", 0, "model-mismatch", "refused global adapter: adapter is for "
                                                                     "model_id ffff…"))
    agg._open_round()
    assert agg.current.asked == {"a"}
    agg.handle("update", "a", encode_update(agg.manifest, random_adapter(agg.manifest, 1), "a", 0, 12))
    agg._tick()
    agg.handle("status", "b", status("b", "idle"))  # the operator installed the right bundle
    agg._open_round()
    assert agg.current.asked == {"a", "b"}


def test_the_aggregators_key_events_carry_structured_fields(tmp_path, caplog):
    agg = offline_aggregator(tmp_path / "state", FakeClock(), rounds=2, metrics_grace_s=0)
    agg._resume_or_start()
    agg.handle("status", "a", status("a"))
    with caplog.at_level(logging.INFO, logger="flora.aggregator"):
        agg._open_round()
        agg.handle("update", "a", encode_update(agg.manifest, random_adapter(agg.manifest, 1), "a", 0, 12))
        agg.handle("update", "a", encode_update(agg.manifest, random_adapter(agg.manifest, 1), "a", 0, 12))
        agg._tick()
    events = [(r.event, r.round, getattr(r, "client", None), getattr(r, "reason", None))
              for r in caplog.records if getattr(r, "event", None)]
    assert events == [("round-open", 0, None, None), ("accepted", 0, "a", None), ("rejected", 0, "a", "duplicate"),
                      ("round-closed", 0, None, None)]


def test_a_large_fleets_snapshot_is_built_less_often(tmp_path, monkeypatch):
    import flora.broker.watch as watch_mod
    from flora.broker.dashboard.snapshot import FederationInfo

    now = [100.0]
    monkeypatch.setattr(watch_mod.time, "monotonic", lambda: now[0])
    snapshots = Snapshots()
    watch = watch_mod.Watch(Checkpoint(tmp_path), FederationInfo(), snapshots)
    for i in range(3000):
        watch.devices.status(f"dev-{i}", "idle", 0.0)
    watch.tick(None, None)
    assert snapshots.latest()[0] == 1
    now[0] += 2.9  # 3,000 devices: one snapshot per 3 s at most
    watch.tick(None, None)
    assert snapshots.latest()[0] == 1
    now[0] += 0.2
    watch.tick(None, None)
    version, latest = snapshots.latest()
    assert version == 2 and len(latest["devices"]) == 3000
