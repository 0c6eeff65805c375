"""flora-sim end to end: mosquitto, the aggregator and agents as real processes, on scikit-learn's digits."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Dict

import numpy as np
import pytest
from PIL import Image

from flora.broker.checkpoint import STATE
from flora.edge import adapter
from flora.edge.bundle import ADAPTER, Bundle, load_bundle
from flora.edge.synthetic import synthetic_manifest
from flora.sim import cli
from flora.sim import report as sim_report
from flora.sim import run as sim_run
from flora.sim import signals as sim_signals
from flora.sim.datasets import DIGIT_NAMES, write_digits
from flora.sim.run import SimConfig, SimError
from flora.sim.signals import Terminated, terminate_as_interrupt

from .helpers import REPO

pytestmark = pytest.mark.mqtt


def test_digits_are_written_once_as_png_folders(tmp_path):
    ds = write_digits(tmp_path / "d")
    assert len(ds.train) + len(ds.test) == 1797 and len(ds.test) == 359
    assert ds.classes == DIGIT_NAMES
    assert sorted(p.name for p in (tmp_path / "d" / "train").iterdir()) == sorted(DIGIT_NAMES)
    first = ds.train[0].path
    mtime = first.stat().st_mtime_ns
    again = write_digits(tmp_path / "d")
    assert again.train == ds.train
    assert first.stat().st_mtime_ns == mtime  # reused, not rewritten


def run_sim(tmp_path, *extra):
    out = tmp_path / "run"
    model = [] if "--model" in extra or "--bundle" in extra else ["--model", "clip-tiny"]  # random-init: plumbing
    code = cli.main(["--clients", "3", "--rounds", "3", "--out", str(out), "--round-timeout", "60", *model, *extra])
    assert code == 0
    return out, json.loads((out / "report.json").read_text())


def test_three_clients_three_rounds_improve_on_zero_shot(tmp_path, mosquitto_binary, capsys):
    out, report = run_sim(tmp_path, "--partition", "iid")
    printed = capsys.readouterr().out
    assert "round  clients  test acc" in printed and f"report: {out / 'report.json'}" in printed
    acc = report["accuracy"]["federated"]
    assert len(acc) == 4 and acc[-1] > acc[0]
    rows = [json.loads(line) for line in (out / "aggregator" / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["num_reported"] == 3 and r["rejected"] == [] for r in rows)
    bundle = load_bundle(out / "bundle")
    blob = (out / "bundle" / ADAPTER).read_bytes()
    size = len(adapter.encode(adapter.decode(blob).tensors, model_id=bundle.manifest.model_id, round=0,
                              kind="update", client_id="client-0", num_samples=100))
    for r in rows:  # three fp32 updates a round, each the adapter plus its header
        assert abs(r["bytes_received"] - 3 * size) <= 3 * 16
        assert r["bytes_sent"] == 3 * r["global_bytes"]
    assert report["bytes"]["up_per_round"] == [r["bytes_received"] for r in rows]
    assert (out / "report.png").stat().st_size > 10_000
    assert all((out / "logs" / f"client-{i}.log").exists() for i in range(3))


def test_a_non_iid_run_completes_and_says_so(tmp_path, mosquitto_binary):
    _, report = run_sim(tmp_path, "--partition", "dirichlet:0.1", "--fp16-updates")
    part = report["partition"]
    assert part["scheme"] == "dirichlet:0.1" and part["non_iid"] is True and part["label_skew"] > 0.3
    assert len(report["rounds"]) == 3 and all(r["num_reported"] == 3 for r in report["rounds"])
    assert sum(map(sum, part["label_histogram"])) == 1438


def test_missing_mosquitto_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import flora.broker.mosquitto as mq

    monkeypatch.setattr(mq.shutil, "which", lambda *a, **k: None)
    code = cli.main(["--clients", "2", "--rounds", "1", "--out", str(tmp_path / "run")])
    assert code == 1
    assert "apt-get install -y mosquitto" in capsys.readouterr().err


# -- the command line ---------------------------------------------------------------------------
def test_help_documents_every_option():
    parser = cli.build_parser()
    for action in parser.options.values():
        assert action.help and action.help != argparse.SUPPRESS, f"{action.option_strings} has no help"
        if action.default not in (None, False) and action.dest != "help":
            assert "%(default)s" in action.help, f"{action.option_strings} does not show its default"


# -- signals: every way out stops every process -------------------------------------------------
def processes_mentioning(needle: str) -> Dict[int, str]:
    """Live processes (not this one) whose command line contains `needle`, by pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            found[int(entry.name)] = cmdline
    return found


def test_sigterm_stops_mosquitto_the_aggregator_and_every_agent(tmp_path, mosquitto_binary, tiny_text_bundle):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flora.sim.cli", "--bundle", str(tiny_text_bundle.root), "--clients", "2", "--rounds",
         "50", "--epochs", "1", "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if re.match(r"^\s+1\s+2/2\s", line):  # round 1 done: broker, aggregator and agents all running
                break
        else:
            pytest.fail(f"flora-sim ended before its first round: {proc.stderr.read()}")
        started = processes_mentioning(str(out))
        started.pop(proc.pid)
        assert len(started) == 4, started  # mosquitto, the aggregator, two agents
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert "stopped by SIGTERM" in proc.stderr.read()
        assert processes_mentioning(str(out)) == {}
    finally:
        proc.kill()
        for pid in processes_mentioning(str(out)):  # only if the test failed: leave nothing behind
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_unwind_like_ctrl_c(signum):
    with pytest.raises(KeyboardInterrupt) as caught, terminate_as_interrupt():
        signal.raise_signal(signum)
    assert isinstance(caught.value, Terminated) and caught.value.signum == signum
    assert signal.getsignal(signum) is not sim_signals._raise_terminated  # handlers restored after the block


class FakeBroker:
    def __init__(self, calls):
        self.calls, self.url, self.env = calls, "mqtt://127.0.0.1:1", {}

    def stop(self):
        self.calls.append("broker stopped")


@pytest.fixture
def ctrl_c_interrupts():
    """SIGINT raises KeyboardInterrupt in this test, whatever handler an earlier test left installed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_during_teardown_does_not_skip_stopping_the_broker(ctrl_c_interrupts):
    calls = []

    class Group:
        def stop(self):
            calls.append("children stopping")
            signal.raise_signal(signal.SIGINT)  # the impatient second Ctrl-C
            calls.append("children stopped")

    with pytest.raises(KeyboardInterrupt):
        sim_run.teardown(Group(), FakeBroker(calls))
    assert calls == ["children stopping", "children stopped", "broker stopped"]


def test_ctrl_c_while_mosquitto_starts_up_still_stops_it(tmp_path, monkeypatch, ctrl_c_interrupts):
    calls = []

    def slow_start(workdir, **sizing):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C during mosquitto's start-up wait
        calls.append("broker started")
        return FakeBroker(calls)

    monkeypatch.setattr(sim_run, "start_mosquitto", slow_start)
    with pytest.raises(KeyboardInterrupt):
        sim_run.federate(SimConfig(model="clip-tiny", out=tmp_path, clients=2), tiny_bundle_stub(), 0.0, lambda m: None)
    assert calls == ["broker started", "broker stopped"]


def tiny_bundle_stub():
    return SimpleNamespace(root=Path("/nonexistent"), manifest=synthetic_manifest())


# -- the bundle: the backend the run needs, reuse only when it fits -----------------------------
def test_bundle_reuse_checks_backend_seed_model_and_classes(tiny_text_bundle, tmp_path):
    ort_only = tiny_text_bundle
    step_only = Bundle(ort_only.root, dataclasses.replace(ort_only.manifest, backends=("step",)))
    fits = SimConfig(model="clip-tiny", seed=0, backend="auto")
    assert sim_run.export_mismatch(ort_only, fits, DIGIT_NAMES) is None
    assert "not step" in sim_run.export_mismatch(ort_only, SimConfig(model="clip-tiny", backend="step"), DIGIT_NAMES)
    assert sim_run.export_mismatch(step_only, SimConfig(model="clip-tiny", backend="step"), DIGIT_NAMES) is None
    ort = SimConfig(model="clip-tiny", backend="ort-training")
    assert "not ort-training" in sim_run.export_mismatch(step_only, ort, DIGIT_NAMES)
    assert "seed" in sim_run.export_mismatch(ort_only, SimConfig(model="clip-tiny", seed=1), DIGIT_NAMES)
    assert "classes" in sim_run.export_mismatch(ort_only, fits, DIGIT_NAMES[:5])
    assert "clip-vitb32" in sim_run.export_mismatch(ort_only, SimConfig(model="clip-vitb32"), DIGIT_NAMES)
    assert sim_run.needed_backends("step") == ("step",)
    assert sim_run.needed_backends("auto") in (("ort-training",), ("step",))
    with pytest.raises(SimError, match="flora-export --backend step"):
        sim_run.given_bundle(SimConfig(model="clip-tiny", bundle=ort_only.root, backend="step"), DIGIT_NAMES)


def test_backend_step_exports_the_step_graph_and_trains_with_it(tmp_path, mosquitto_binary):
    out, report = run_sim(tmp_path, "--clients", "2", "--rounds", "2", "--epochs", "1", "--backend", "step")
    assert report["bundle"]["backends"] == ["step"]
    assert [r["num_reported"] for r in report["rounds"]] == [2, 2]
    assert all("trainer step" in (out / "logs" / f"client-{i}.log").read_text() for i in range(2))
    said = []
    cfg = SimConfig(model="clip-tiny", out=out, backend="step")
    assert sim_run.prepare_bundle(cfg, DIGIT_NAMES, said.append).manifest.backends == ("step",)
    assert said == [f"reusing the bundle in {out / 'bundle'}"]


# -- baselines ----------------------------------------------------------------------------------
def test_compare_reports_all_four_methods_on_the_agents_training_splits(tmp_path, mosquitto_binary,
                                                                         tiny_text_bundle):
    out, report = run_sim(tmp_path, "--clients", "2", "--rounds", "2", "--partition", "IID", "--compare",
                          "--bundle", str(tiny_text_bundle.root))
    acc = report["accuracy"]
    initial = json.loads((out / "aggregator" / STATE).read_text())["extra"]["initial_eval"]
    assert set(report["methods"]) == {"zero_shot", "federated", "centralised", "centralised_equal_steps", "local_only"}
    assert all(len(acc[m]) == 3 for m in ("federated", "centralised", "centralised_equal_steps", "local_only"))
    steps = report["steps"]["per_round"]
    sizes = report["rounds"][0]["reported"]
    assert steps["federated_per_client"] == {c: 5 * -(-n // 32) for c, n in sizes.items()}  # 5 epochs of batch 32
    assert steps["federated_per_client"] == report["steps"]["reported_by_agents"]  # what the agents said they ran
    assert steps["centralised"] == 5 * -(-sum(sizes.values()) // 32) > steps["centralised_equal_steps"]
    assert report["comparison"]["window"] == 2 and "rounds_to_target" in report["comparison"]
    assert acc["zero_shot"] == acc["federated"][0] == initial["test_accuracy"]  # the aggregator's round 0
    assert acc["centralised"][-1] > acc["zero_shot"]
    per_client = acc["local_only_per_client"]
    assert sorted(per_client) == ["client-0", "client-1"]
    for r in (1, 2):
        assert acc["local_only"][r] == pytest.approx(np.mean([per_client[c][r] for c in per_client]))
    trained = report["baselines"]["train_images"]
    assert trained["local_only"] == report["rounds"][0]["reported"]  # what each agent trained on
    assert trained["centralised"] == sum(trained["local_only"].values()) < sum(report["partition"]["client_sizes"])
    assert report["partition"]["non_iid"] is False and report["partition"]["kind"] == "iid"


def test_failed_baselines_keep_the_federated_report(tmp_path, mosquitto_binary, tiny_text_bundle, monkeypatch,
                                                    capsys):
    import flora.sim.baselines as baselines

    def broken(*args, **kwargs):
        raise RuntimeError("no baseline today")

    monkeypatch.setattr(baselines, "centralised", broken)
    out = tmp_path / "run"
    code = cli.main(["--clients", "2", "--rounds", "1", "--epochs", "1", "--compare", "--out", str(out),
                     "--bundle", str(tiny_text_bundle.root)])
    assert code == 1
    assert "no baseline today" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert len(report["accuracy"]["federated"]) == 2 and len(report["rounds"]) == 1
    assert "no baseline today" in report["baselines_error"]
    assert (out / "report.png").exists()


# -- the report figure --------------------------------------------------------------------------
class RecordingAxes:
    def __init__(self):
        self.lines = []

    def plot(self, xs, ys, **kw):
        self.lines.append((list(xs), list(ys), kw.get("label")))

    def __getattr__(self, name):
        return lambda *a, **k: None


def test_traffic_is_cumulative_and_sits_at_the_rounds_where_accuracy_is_plotted():
    report = {"rounds": [{"round": 0}, {"round": 1}, {"round": 2}],
              "bytes": {"up_per_round": [1e6, 2e6, 3e6], "down_per_round": [2e6, 2e6, 2e6]}}
    ax = RecordingAxes()
    sim_report.plot_bytes(ax, report)
    (up_x, up_y, up_label), (down_x, down_y, down_label) = ax.lines
    assert up_x == down_x == [1, 2, 3]  # the accuracy after round r is plotted at x = r + 1
    assert up_y == [1.0, 3.0, 6.0] and down_y == [2.0, 4.0, 6.0] and (up_label, down_label) == ("up", "down")


# -- an image-folder dataset, few-shot, a comma in its path ------------------------------------
def colour_folder(root: Path, per_class: int = 20) -> Path:
    """Three classes of noisy 32x32 colour squares: root/<class>/<i>.png."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["red", "green", "blue"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
            pixels[..., c] = 200
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_an_image_folder_with_shots_and_a_comma_in_its_path(tmp_path, mosquitto_binary):
    data = colour_folder(tmp_path / "my images, v2")
    _, report = run_sim(tmp_path, "--dataset", str(data), "--clients", "2", "--rounds", "2", "--epochs", "1",
                          "--shots", "4")
    assert report["dataset"] == {"name": "my images, v2", "classes": ["blue", "green", "red"], "train": 48,
                                 "test": 12}
    part = report["partition"]
    assert part["few_shot"] is True and part["shots"] == 4
    assert part["label_histogram"] == [[4, 4, 4], [4, 4, 4]] and part["client_sizes"] == [12, 12]
    assert [r["num_reported"] for r in report["rounds"]] == [2, 2]
    assert report["rounds"][0]["reported"] == {"client-0": 11, "client-1": 11}  # less one validation image each
    assert len(report["accuracy"]["federated"]) == 3 and None not in report["accuracy"]["federated"]


def test_secure_aggregation_gives_plain_fedavgs_accuracy_within_the_quantization_bound(tmp_path, mosquitto_binary,
                                                                                        tiny_text_bundle):
    """The same seeds, plain then secure (enrolled devices, the certificate broker, SecAgg+): the same accuracy
    every round and globals within 2^-16 per element (the encoding's bound, frac_bits 16)."""
    from flora.edge.adapter import load_file

    runs = {}
    for name, extra in (("plain", []), ("secure", ["--secure-aggregation"])):
        out = tmp_path / name
        assert cli.main(["--clients", "4", "--rounds", "2", "--epochs", "1", "--out", str(out), "--round-timeout",
                         "120", "--bundle", str(tiny_text_bundle.root), *extra]) == 0
        runs[name] = (out, json.loads((out / "report.json").read_text()))
    (plain_out, plain), (secure_out, secure) = runs["plain"], runs["secure"]
    assert secure["accuracy"]["federated"] == plain["accuracy"]["federated"]
    rows = [json.loads(line) for line in (secure_out / "aggregator" / "history.jsonl").read_text().splitlines()]
    assert all(r["secure_aggregation"]["survivors"] == [f"client-{i}" for i in range(4)] for r in rows)
    assert all(abs(r["bytes_received"] - 2 * p["bytes_received"]) < 0.1 * p["bytes_received"]  # 64-bit ring
               for r, p in zip(rows, plain["rounds"]))
    a, b = (load_file(out / "aggregator" / "global-000002.safetensors").as_float32() for out in (plain_out, secure_out))
    assert 0 < max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 2.0 ** -16
    assert all((secure_out / "clients" / f"client-{i}" / "identity" / "identity.key").exists() for i in range(4))
    log = (secure_out / "logs" / "aggregator.log").read_text()
    assert "signing global and round" in log and "secure aggregation done: the sum of 4 client(s)" in log
