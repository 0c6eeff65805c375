"""The operator's dashboard: the device registry, the snapshot of a state dir, the HTTP server (auth, assets,
server-sent events, /metrics parsed by prometheus_client's own parser), and the agent's /metrics."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flora.broker.checkpoint import Checkpoint
from flora.broker.dashboard.metrics import metrics_endpoint
from flora.broker.dashboard.server import STATIC, Dashboard, DashboardError, Snapshots, parse_address
from flora.broker.dashboard.snapshot import FederationInfo, build_snapshot, from_state_dir
from flora.broker.devices import DeviceRegistry
from flora.edge.prometheus import AgentMetrics

#: The vendored Chart.js 4.6.1 (npm `chart.js`, dist/chart.umd.min.js); scripts/vendor-chartjs.sh refreshes it.
CHART_JS_SHA256 = "87364cc2b2a76a6684929e7d6b80b18a897794db38400caff1fcf1791c6925d2"


def make_state_dir(root: Path, rounds: int = 3, now: float = 1_000.0) -> Path:
    """A state dir as an aggregator leaves it after `rounds` rounds, with round `rounds` open and 3 devices."""
    cp = Checkpoint(root)
    st = cp.start("m" * 64, 5, b"initial")
    st.extra["initial_eval"] = {"test_accuracy": 0.1, "test_loss": 2.3}
    st.extra["federation"] = {"federation": "demo", "min_clients": 2, "strategy": "fedavg", "round_timeout_s": 60}
    cp.save(st)
    for r in range(rounds):
        row = {"round": r, "num_asked": 3, "num_reported": 3, "num_rejected": r,
               "rejection_counts": {"late": r} if r else {}, "bytes_received": 300_000, "bytes_sent": 400_000,
               "wall_time_s": 2.5 + r, "aggregation_s": 0.02, "test_accuracy": 0.2 + 0.2 * r,
               "test_loss": 2.0 - 0.5 * r, "mean_client_accuracy": 0.3 + 0.1 * r, "epsilon": 1.5 * (r + 1)}
        st = cp.commit(st, r + 1, b"global-%d" % r, row, False)
    reg = DeviceRegistry()
    reg.status("dev-a", "idle", now, backend="step", num_samples=100)
    reg.metrics("dev-a", now, {"round": 2, "loss": 0.5, "accuracy": 0.8, "step_time_s": 0.012, "peak_rss_mb": 180})
    reg.status("dev-b", "error", now - 30, backend="ort-training", num_samples=50,
               last_error="<img src=x onerror=alert(1)> round 2 failed")
    reg.status("dev-c", "offline", now - 300)
    cp.save_devices(reg.to_json())
    cp.save_open_round(rounds, {"number": rounds, "asked": ["dev-a", "dev-b", "dev-c"], "reported": {"dev-a": 100},
                                "rejection_counts": {"duplicate": 1}, "deadline": now + 40, "started_at": now - 5,
                                "extensions": 1})
    return root


# -- the device registry ------------------------------------------------------------------------

def test_the_registry_keeps_the_latest_status_and_metrics_of_each_device():
    reg = DeviceRegistry()
    reg.status("c1", "training", 10.0, round=3, backend="step", num_samples=40)
    reg.metrics("c1", 12.0, {"round": 3, "loss": 0.7, "accuracy": 0.6, "samples": 40, "step_time_s": 0.01,
                             "peak_rss_mb": 120.0, "ignored": "x"})
    reg.status("c1", "idle", 13.0, round=3, num_samples=40)  # a status without backend keeps the known one
    d = reg.get("c1")
    assert (d.state, d.last_seen, d.backend, d.num_samples, d.loss, d.accuracy) == ("idle", 13.0, "step", 40, 0.7,
                                                                                     0.6)
    reg.status("c2", "error", 14.0, last_error="x" * 5000, error_code="model-mismatch")
    assert len(reg.get("c2").last_error) == 500 and reg.by_state() == {"error": 1, "idle": 1}
    again = DeviceRegistry.from_json(json.loads(json.dumps(reg.to_json())))
    assert again.rows() == reg.rows()
    assert reg.forget("c2") and not reg.forget("c2") and [r["client_id"] for r in reg.rows()] == ["c1"]


def test_the_registry_is_bounded_and_forgets_the_longest_unheard_device_first():
    reg = DeviceRegistry(max_devices=3)
    for i, name in enumerate(["a", "b", "c"]):
        reg.status(name, "online", float(i))
    reg.metrics("a", 5.0, {"loss": 1.0})  # heard again: now the most recent
    reg.status("d", "online", 6.0)  # evicts b, the longest unheard
    assert sorted(r["client_id"] for r in reg.rows()) == ["a", "c", "d"]
    for i in range(1000):  # a flood of made-up ids never grows it
        reg.status(f"ghost-{i}", "online", 10.0 + i)
    assert len(reg) == 3
    restored = DeviceRegistry.from_json(reg.to_json())
    restored.status("new", "online", 2000.0)
    assert "ghost-997" not in {r["client_id"] for r in restored.rows()}  # the restored order is by last_seen


# -- the snapshot -------------------------------------------------------------------------------

def test_a_state_dir_snapshot_numbers_points_by_rounds_completed_and_adds_up_the_totals(tmp_path):
    snap = from_state_dir(make_state_dir(tmp_path / "agg"), now=1_010.0)
    assert snap["federation"] == "demo" and snap["live"] is False and snap["phase"] == "open"
    assert [p["rounds_completed"] for p in snap["points"]] == [0, 1, 2, 3]
    assert [p["test_accuracy"] for p in snap["points"]] == pytest.approx([0.1, 0.2, 0.4, 0.6])
    assert snap["totals"] == {"bytes_up": 900_000, "bytes_down": 1_200_000, "updates_accepted": 9,
                              "updates_rejected": 3, "rounds_failed": 0}
    assert snap["rejections"] == {"late": 3} and snap["epsilon"] == pytest.approx(4.5)
    assert snap["current"] == {"number": 3, "asked": 3, "reported": 1, "rejected": 1,
                               "rejection_counts": {"duplicate": 1}, "deadline": 1_040.0, "started_at": 995.0,
                               "extensions": 1, "quorum": 2}
    assert [d["client_id"] for d in snap["devices"]] == ["dev-a", "dev-b", "dev-c"]
    json.dumps(snap, allow_nan=False)  # strict JSON


def test_an_empty_or_missing_state_dir_gives_an_empty_snapshot(tmp_path):
    snap = from_state_dir(tmp_path / "nothing", now=1.0)
    assert snap["phase"] == "waiting" and snap["points"] == [] and snap["devices"] == []
    assert not (tmp_path / "nothing").exists()  # read-only: nothing created
    done = build_snapshot({"done": True, "round": 2, "rounds_total": 2}, [{"round": 0}, {"round": 1}], None, [],
                          FederationInfo(), now=1.0)
    assert done["phase"] == "done" and done["rounds_completed"] == 2 and done["current"] is None


# -- the server ---------------------------------------------------------------------------------

def get(url: str, headers=None, timeout: float = 5.0):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return res.status, dict(res.headers), res.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture
def served(tmp_path):
    snaps = Snapshots()
    snaps.publish(from_state_dir(make_state_dir(tmp_path / "agg"), now=1_010.0))
    dash = Dashboard("127.0.0.1:0", snaps, metrics_endpoint(snaps.latest), token="s3cret").start()
    yield dash, snaps
    dash.stop()


def test_the_server_asks_for_the_token_and_serves_only_its_own_assets(served):
    dash, _ = served
    assert get(dash.url)[0] == 401 and "Basic" in get(dash.url)[1]["WWW-Authenticate"]
    basic = {"Authorization": "Basic " + base64.b64encode(b"anyone:s3cret").decode()}
    wrong = {"Authorization": "Basic " + base64.b64encode(b"anyone:guess").decode()}
    assert get(dash.url, wrong)[0] == 401 and get(dash.url, {"Authorization": "Bearer guess"})[0] == 401
    status, headers, body = get(dash.url, basic)
    assert status == 200 and b"/static/chart.umd.min.js" in body and "default-src 'self'" in headers[
        "Content-Security-Policy"]
    assert b"http" not in body.replace(b"http-equiv", b"")  # no asset from elsewhere: the page works offline
    bearer = {"Authorization": "Bearer s3cret"}
    for name in ("app.js", "style.css", "chart.umd.min.js"):
        assert get(dash.url + "static/" + name, bearer)[0] == 200
    for path in ("static/../server.py", "static/index.html", "static/CHART_JS_LICENSE.md", "nope", "api/../x"):
        assert get(dash.url + path, bearer)[0] == 404
    state = json.loads(get(dash.url + "api/state", bearer)[2])
    assert state["federation"] == "demo" and len(state["devices"]) == 3


def test_events_stream_the_snapshot_and_every_change(served):
    dash, snaps = served
    req = urllib.request.Request(dash.url + "api/events", headers={"Authorization": "Bearer s3cret"})
    with urllib.request.urlopen(req, timeout=10) as res:
        assert res.headers["Content-Type"] == "text/event-stream"

        def next_event():
            lines = []
            while True:
                line = res.readline().decode()
                if line == "\n" and lines:
                    return lines
                if line.strip():
                    lines.append(line.strip())

        first = next_event()
        assert first[0] == "event: snapshot" and json.loads(first[1][len("data: "):])["rounds_completed"] == 3
        changed = dict(snaps.latest()[1], rounds_completed=4)
        threading.Timer(0.2, snaps.publish, args=(changed,)).start()
        t0 = time.monotonic()
        second = next_event()
        assert json.loads(second[1][len("data: "):])["rounds_completed"] == 4 and time.monotonic() - t0 < 5


def test_metrics_parse_with_prometheus_clients_own_parser_and_match_the_snapshot(served):
    dash, _ = served
    status, headers, body = get(dash.url + "metrics", {"Authorization": "Bearer s3cret"})
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}
    assert samples[("flora_rounds_completed_total", ())] == 3
    assert samples[("flora_updates_accepted_total", ())] == 9
    assert samples[("flora_updates_rejected_total", (("reason", "late"),))] == 3
    assert samples[("flora_bytes_received_bytes_total", ())] == 900_000
    assert samples[("flora_devices", (("state", "error"),))] == 1
    assert samples[("flora_round", ())] == 3 and samples[("flora_privacy_epsilon", ())] == pytest.approx(4.5)
    assert samples[("flora_round_duration_seconds_count", ())] == 3
    assert samples[("flora_round_duration_seconds_sum", ())] == pytest.approx(2.5 + 3.5 + 4.5)
    assert samples[("flora_round_duration_seconds_bucket", (("le", "5.0"),))] == 3
    assert samples[("flora_test_accuracy", ())] == pytest.approx(0.6)


def test_addresses_default_to_loopback_and_bad_ones_are_refused():
    assert parse_address("8080") == ("127.0.0.1", 8080)
    assert parse_address("0.0.0.0:9000") == ("0.0.0.0", 9000) and parse_address("[::1]:81") == ("::1", 81)
    for bad in ("host:port", "127.0.0.1:70000", ""):
        with pytest.raises(DashboardError):
            parse_address(bad)


def test_the_vendored_chart_library_is_the_released_file():
    assert hashlib.sha256((STATIC / "chart.umd.min.js").read_bytes()).hexdigest() == CHART_JS_SHA256
    assert (STATIC / "CHART_JS_LICENSE.md").read_text().startswith("The MIT License")


# -- the agent's /metrics -----------------------------------------------------------------------

def test_the_agents_metrics_port_serves_its_last_round():
    m = AgentMetrics("dev-7", "step")
    port = m.serve(0)
    try:
        m.record_round(4, step_time_s=0.02, wall_time_s=3.5, samples=120, peak_rss_mb=200.0, loss=0.9,
                       accuracy=0.75)
        m.record_round(5, step_time_s=0.03, wall_time_s=3.0, samples=120, peak_rss_mb=210.0, loss=0.8, accuracy=None)
        body = get(f"http://127.0.0.1:{port}/metrics")[2].decode()
    finally:
        m.stop()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body) for s in fam.samples}
    assert samples[("flora_agent_last_round", ())] == 5 and samples[("flora_agent_rounds_total", ())] == 2
    assert samples[("flora_agent_step_time_seconds", ())] == pytest.approx(0.03)
    assert samples[("flora_agent_peak_rss_bytes", ())] == 210 * 2 ** 20
    assert samples[("flora_agent_last_accuracy", ())] == pytest.approx(0.75)  # kept: the last round had none
    assert samples[("flora_agent_info", (("backend", "step"), ("client_id", "dev-7")))] == 1


def test_every_metric_the_grafana_dashboard_queries_is_exported(served):
    dash, _ = served
    agent = AgentMetrics("dev-1", "step")
    agent.record_round(1, step_time_s=0.01, wall_time_s=1.0, samples=10, peak_rss_mb=100.0, loss=1.0, accuracy=0.5)
    from prometheus_client import generate_latest

    exported = {s.name for text in (get(dash.url + "metrics", {"Authorization": "Bearer s3cret"})[2].decode(),
                                    generate_latest(agent.registry).decode())
                for fam in text_string_to_metric_families(text) for s in fam.samples}
    grafana = json.loads((Path(__file__).resolve().parents[1] / "devices" / "grafana" / "flora-dashboard.json")
                         .read_text())
    import re

    queried = {name for p in grafana["panels"] for t in p["targets"] for name in re.findall(r"flora_\w+", t["expr"])}
    assert len(queried) >= 12 and queried <= exported, sorted(queried - exported)


# -- in a real browser ----------------------------------------------------------------------------

def artifacts_dir() -> Path:
    """Where browser tests leave their screenshots: $FLORA_TEST_ARTIFACTS, else runs/test-artifacts/."""
    import os

    root = Path(os.environ.get("FLORA_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "runs" /
                "test-artifacts")
    root.mkdir(parents=True, exist_ok=True)
    return root


def chromium_binary() -> str:
    import os
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("FLORA_REQUIRE_CHROMIUM"):  # set by .ci/run, which installs Debian's chromium
        pytest.fail("chromium is not installed (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium)")


def browse(url: str, screenshot: Path, ready=lambda dom: 'data-loaded="true"' in dom) -> str:
    """The page's DOM once `ready(dom)` (its scripts ran for 3 s, then longer on a busy machine: up to 3 tries),
    and a screenshot of it taken as long after loading."""
    import subprocess

    for wait_ms in (3000, 8000, 20000):
        base = [chromium_binary(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                "--no-first-run", f"--timeout={wait_ms}", "--window-size=1280,1100"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        assert dom.returncode == 0, dom.stderr[-2000:]
        if ready(dom.stdout):
            break
    shot = subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    return dom.stdout


def page_facts(dom: str):
    """(round points drawn, device rows shown, the page's own device count) from the rendered DOM."""
    import re

    body = re.search(r"<body[^>]*>", dom).group(0)
    points = int(re.search(r'data-round-points="(\d+)"', body).group(1))
    devices = int(re.search(r'data-devices="(\d+)"', body).group(1))
    return points, re.findall(r'<tr data-client="([^"]+)"', dom), devices, 'data-loaded="true"' in body


def test_the_read_only_dashboard_of_a_state_dir_renders_in_chromium(tmp_path):
    from flora.broker.dashboard.server import state_dir_dashboard

    dash = state_dir_dashboard(make_state_dir(tmp_path / "agg", now=time.time()), "127.0.0.1:0").start()
    try:
        dom = browse(dash.url, artifacts_dir() / "dashboard-state-dir.png")
    finally:
        dash.stop()
    points, rows, devices, loaded = page_facts(dom)
    assert loaded and "data-error" not in dom.split(">", 2)[1] and points == 4
    assert rows == ["dev-a", "dev-b", "dev-c"] and devices == 3
    assert "&lt;img src=x onerror=alert(1)&gt;" in dom and "<img src=x" not in dom  # device text is text
    assert "read-only (state dir)" in dom


@pytest.mark.mqtt
def test_the_live_dashboard_of_a_running_three_agent_federation_renders_in_chromium(tmp_path, mosquitto_binary,
                                                                                     tiny_text_bundle):
    import signal
    import socket
    import subprocess
    import sys

    chromium_binary()  # skip (or fail under CI) before starting a federation
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flora.sim.cli", "--bundle", str(tiny_text_bundle.root), "--clients", "3", "--rounds",
         "200", "--epochs", "1", "--out", str(out), "--http", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        history = out / "aggregator" / "history.jsonl"
        deadline = time.monotonic() + 300
        while not (history.exists() and len(history.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no two rounds within 300 s"
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/"
        dom = browse(url, artifacts_dir() / "dashboard-live.png",
                     ready=lambda d: page_facts(d)[0] >= 3 and len(page_facts(d)[1]) == 3)
        points, rows, devices, loaded = page_facts(dom)
        assert loaded and points >= 3 and sorted(rows) == ["client-0", "client-1", "client-2"] and devices == 3
        assert "live" in dom and "read-only" not in dom
        body = get(url + "metrics")[2].decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(body) for s in fam.samples}
        assert samples[("flora_rounds_completed_total", ())] >= 2
        assert sum(v for (name, _), v in samples.items() if name == "flora_devices") == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
