"""flora-aggregator's command line without a broker: argument and config errors, `status`, `plot`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flora.broker import report
from flora.broker.cli import main
from flora.broker.rounds import Sampling
from flora.edge import adapter
from flora.edge.synthetic import encode_update, random_adapter, synthetic_manifest, write_bundle

from .fakes import FakeClock, metrics, offline_aggregator, status

M = synthetic_manifest()


@pytest.fixture
def bundle(tmp_path) -> Path:
    return write_bundle(tmp_path / "bundle", M)


@pytest.mark.parametrize("args, config, message", [
    (["--broker", "mqtt://h"], None, "give exactly one of --bundle and --manifest"),
    (["--broker", "mqtt://h", "--manifest", "{bundle}/manifest.json", "--bundle", "{bundle}"], None,
     "give exactly one of --bundle and --manifest"),
    (["--bundle", "{bundle}"], None, "missing --broker"),
    (["--bundle", "{bundle}/nowhere", "--broker", "mqtt://h"], None, "no manifest at"),
    (["--bundle", "{bundle}", "--broker", "ftp://h"], None, "must start with mqtt:// or mqtts://"),
    (["--bundle", "{bundle}", "--broker", "mqtt://h", "--fraction", "0.5", "--clients-per-round", "2"], None,
     "give --clients-per-round or --fraction, not both"),
    (["--bundle", "{bundle}", "--broker", "mqtt://h", "--min-clients", "0"], None, "--min-clients must be >= 1"),
    (["--bundle", "{bundle}", "--broker", "mqtt://h", "--round-timeout", "0"], None, "--round-timeout must be > 0"),
    (["--bundle", "{bundle}", "--broker", "mqtt://h", "--rounds", "0"], None, "--rounds must be >= 1"),
    (["--bundle", "{bundle}", "--broker", "mqtt://h", "--strategy", "krum"], None, "unknown --strategy 'krum'"),
    (["--bundle", "{bundle}", "--broker", "mqtt://h", "--lr", "-1"], None, "lr must be > 0"),
    (["--bundle", "{bundle}", "--broker", "mqtt://h", "--max-num-samples", "0"], None,
     "--max-num-samples must be >= 1"),
    (["--bundle", "{bundle}", "--broker", "mqtt://h", "--max-extensions", "-1"], None, "--max-extensions must be >= 0"),
    (["--bundle", "{bundle}", "--broker", "mqtt://h", "--max-queued-updates", "0"], None,
     "--max-queued-updates must be >= 1"),
    (["--bundle", "{bundle}", "--broker", "mqtt://h", "--secure-aggregation", "--strategy", "median"], None,
     "--strategy median: under secure aggregation the aggregator sees only the sum of the updates"),
    (["--bundle", "{bundle}", "--broker", "mqtt://h", "--secure-aggregation", "--shares", "4", "--threshold", "2"],
     None, "--threshold must be > shares/2"),
    (["--bundle", "{bundle}", "--broker", "mqtt://h", "--secure-aggregation", "--threshold", "3"], None,
     "--threshold needs --shares"),
    (["--config", "{tmp}/agg.toml"], 'brokr = "mqtt://h"\n', "config file has unknown keys ['brokr']"),
    (["--config", "{tmp}/agg.toml"], "rounds = [", "is not valid TOML"),
    (["--config", "{tmp}/missing.toml"], None, "cannot read config file"),
])
def test_bad_arguments_exit_2_with_a_message_naming_the_problem(args, config, message, bundle, tmp_path, capsys):
    if config is not None:
        (tmp_path / "agg.toml").write_text(config)
    args = [a.format(bundle=bundle, tmp=tmp_path) for a in args]
    assert main([*args, "--state-dir", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flora-aggregator: error: ") and message in err, err


def test_an_initial_adapter_of_another_model_is_refused(bundle, tmp_path, capsys):
    other = synthetic_manifest(width=8)
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(adapter.encode(random_adapter(other, 0), model_id=other.model_id, round=0, kind="initial"))
    args = ["--manifest", str(bundle / "manifest.json"), "--initial-adapter", str(foreign), "--broker", "mqtt://h",
            "--state-dir", str(tmp_path / "s")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"adapter is for model_id {other.model_id[:16]}…, this bundle is {M.model_id[:16]}…" in err
    foreign.write_bytes(adapter.encode(random_adapter(other, 0), model_id=M.model_id, round=0, kind="initial"))
    assert main(args) == 2  # the right model_id on the wrong tensors
    assert "has shape [4, 8], the bundle says [4, 16]" in capsys.readouterr().err
    assert not (tmp_path / "s" / "state.json").exists()


def test_status_shows_the_open_round_and_the_history_table(tmp_path, capsys):
    clock = FakeClock()
    agg = offline_aggregator(tmp_path / "state", clock, rounds=3, sampling=Sampling(min_clients=1),
                             on_round_closed=lambda r, t: {"test_accuracy": 0.3})
    agg._resume_or_start()
    for c in ("a", "b"):
        agg.handle("status", c, status(c))
    agg._open_round()
    for i, c in enumerate(("a", "b")):
        agg.handle("update", c, encode_update(agg.manifest, random_adapter(agg.manifest, i), c, 0, 10 + i))
        agg.handle("metrics", c, metrics(c, 0, 0.5 + i / 10))
    agg.handle("update", "a", b"junk")
    clock.t += 12.5
    agg._close_round()
    agg._open_round()
    agg.handle("update", "b", encode_update(agg.manifest, random_adapter(agg.manifest, 7), "b", 1, 3))

    assert main(["status", "--state-dir", str(tmp_path / "state")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("round 1 open (asked 2, 1 update(s) accepted so far, extended 0 time(s)); "
                           "1 of 3 rounds completed")
    assert out[1].split() == ["round", "asked", "reported", "rejected", "samples", "client", "acc", "test", "acc",
                              "MB", "up", "MB", "down", "time", "s"]
    # numbered by rounds completed, as flora-sim numbers its table: the global round 0 closed with is "1"
    assert out[3].split()[:7] == ["1", "2", "2", "1", "21", "0.5500", "0.3000"] and out[3].split()[-1] == "12.5"
    assert out[4] == "rejected updates by reason: {'malformed': 1}"
    assert main(["status", "--state-dir", str(tmp_path / "nothing")]) == 2
    assert "no readable aggregator state" in capsys.readouterr().err


def test_plot_needs_rounds_and_matplotlib_and_says_so(tmp_path, monkeypatch, capsys):
    agg = offline_aggregator(tmp_path / "state", FakeClock(), rounds=2)
    agg._resume_or_start()
    assert main(["plot", "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "p.png")]) == 2
    assert "no completed rounds" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the `plot` extra were not installed
    assert report.write_plot(tmp_path / "state", tmp_path / "p.png") == 2
    assert "plotting needs matplotlib: pip install 'flora-edge[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_explicit_command_line_values_win_over_the_config_file(bundle, tmp_path, monkeypatch):
    """`--rounds 10` equals the parser's default, and must still beat the config file's `rounds = 3`."""
    import flora.broker.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "run", lambda args: seen.update(vars(args)) or 0)
    (tmp_path / "agg.toml").write_text(f'broker = "mqtt://h"\nbundle = "{bundle}"\nrounds = 3\nlr = 0.5\n')
    assert main(["--config", str(tmp_path / "agg.toml"), "--rounds", "10"]) == 0
    assert seen["rounds"] == 10 and seen["lr"] == 0.5 and seen["broker"] == "mqtt://h"
    assert main(["--config", str(tmp_path / "agg.toml")]) == 0
    assert seen["rounds"] == 3


def test_status_clients_lists_each_device_from_the_state_dir(tmp_path, capsys):
    from flora.broker.checkpoint import Checkpoint
    from flora.broker.devices import DeviceRegistry

    agg = offline_aggregator(tmp_path / "state", FakeClock(), rounds=2)
    agg._resume_or_start()
    reg = DeviceRegistry()
    reg.status("pi-01", "idle", 1000.0, backend="step", num_samples=120)
    reg.metrics("pi-01", 1000.0, {"round": 4, "loss": 0.25, "accuracy": 0.875, "step_time_s": 0.0123,
                                  "peak_rss_mb": 210.4})
    reg.status("jetson-2", "error", 940.0, backend="ort-training", num_samples=80,
               last_error="round 4 failed: TrainerError: non-finite loss")
    Checkpoint(tmp_path / "state").save_devices(reg.to_json())
    assert report.print_status(tmp_path / "state", clients=True, now=1060.0) == 0
    out = capsys.readouterr().out.splitlines()
    at = out.index("2 device(s):")
    assert out[at + 1].split()[:6] == ["device", "state", "seen", "backend", "samples", "round"]
    assert out[at + 3].split()[:6] == ["jetson-2", "error", "2m", "ort-training", "80", "-"]
    assert out[at + 3].endswith("round 4 failed: TrainerError: non-finite loss")
    assert out[at + 4].split() == ["pi-01", "idle", "60s", "step", "120", "4", "0.2500", "0.875", "12.3", "210"]
    assert main(["status", "--state-dir", str(tmp_path / "state"), "--clients"]) == 0
    assert "pi-01" in capsys.readouterr().out
