"""flora-sim end to end: mosquitto, the aggregator and agents as real processes, on scikit-learn's digits."""

from __future__ import annotations

import json

import pytest

from edge import adapter
from edge.bundle import ADAPTER, load_bundle
from sim import cli
from sim.datasets import DIGIT_NAMES, write_digits

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
    code = cli.main(["--clients", "3", "--rounds", "3", "--out", str(out), "--round-timeout", "60", *extra])
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
    import broker.mosquitto as mq

    monkeypatch.setattr(mq.shutil, "which", lambda *a, **k: None)
    code = cli.main(["--clients", "2", "--rounds", "1", "--out", str(tmp_path / "run")])
    assert code == 1
    assert "apt-get install -y mosquitto" in capsys.readouterr().err
