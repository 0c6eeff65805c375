"""devices/: the agent's self-test, the example configs, the systemd unit and the install scripts."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.mosquitto import free_port
from edge import cli
from edge.config import load_toml, merge_config

from .conftest import REPO

DEVICES = REPO / "devices"


def run_doctor(capsys, *argv):
    code = cli.main(["doctor", *argv])
    return code, capsys.readouterr().out


def test_doctor_says_ready_and_measures_a_step(tiny_all_bundle, mosquitto, capsys):
    code, out = run_doctor(capsys, "--bundle", str(tiny_all_bundle.root), "--batch-size", "16",
                           "--backend", "step", "--broker", mosquitto.url)
    assert code == 0, out
    lines = dict((ln.split()[1], ln) for ln in out.splitlines() if ln[:4] in ("OK  ", "WARN", "FAIL", "INFO"))
    assert lines["runtime"].startswith("OK") and "onnxruntime" in lines["runtime"]
    assert lines["trainer"].startswith("OK") and lines["trainer"].endswith("step")
    assert "one training step at batch 16" in lines["step"] and "samples/s" in lines["step"]
    assert "training peak" in lines["memory"] and "a batch that fits" in lines["memory"]
    assert lines["broker"].startswith("OK") and "accepted an MQTT 5 connection" in lines["broker"]
    assert out.strip().splitlines()[-1].startswith("VERDICT: ready")


def test_doctor_fails_on_an_unreachable_broker_and_a_missing_bundle(tiny_text_bundle, tmp_path, capsys):
    code, out = run_doctor(capsys, "--bundle", str(tiny_text_bundle.root),
                           "--broker", f"mqtt://127.0.0.1:{free_port()}")
    assert code == 1
    assert "FAIL  broker" in out and "Connection refused" in out
    assert out.strip().splitlines()[-1] == "VERDICT: not ready (1 problem)"
    code, out = run_doctor(capsys, "--bundle", str(tmp_path / "nope"))
    assert code == 1 and "FAIL  bundle" in out and "no manifest" in out


def test_suggested_batch_size_fits_the_memory():
    from edge.doctor import suggest_batch

    # 210 MiB fixed (peak at batch 1 over the baseline), 10 MiB per sample ((620 - 310) / 31):
    # 1000 MiB available -> 0.8 * 1000 - 210 = 590 MiB -> 59 samples -> 32
    assert suggest_batch(peak_1=310, peak_n=620, n=32, available=1000, baseline=100) == 32
    assert suggest_batch(peak_1=310, peak_n=620, n=32, available=300, baseline=100) == 2  # 30 MiB -> 3 -> 2
    assert suggest_batch(peak_1=310, peak_n=620, n=32, available=250, baseline=100) == 1  # nothing left


@pytest.mark.parametrize("path", ["agent.example.toml", "jetson/agent.example.toml"])
def test_example_agent_configs_use_only_known_keys(path):
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices["run"]
    args = parser.parse_args(["run"])
    config = load_toml(DEVICES / path)
    merged = merge_config(args, sub, config, cli.RUN_KEYS)
    assert merged.client_id and merged.broker.startswith("mqtts://") and merged.tls_ca
    assert "password" not in config  # secrets belong in agent.env


def test_systemd_unit_runs_unprivileged_with_restart_state_and_journald():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(DEVICES / "systemd" / "flora-agent.service")
    service = unit["Service"]
    assert service["User"] == "flora" and service["Restart"] == "on-failure"
    assert service["ExecStart"].endswith("flora-agent run --config /etc/flora/agent.toml")
    assert service["StateDirectory"] == "flora" and service["StandardOutput"] == "journal"
    assert service["EnvironmentFile"] == "-/etc/flora/agent.env"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    if shutil.which("systemd-analyze"):
        proc = subprocess.run(["systemd-analyze", "verify", str(DEVICES / "systemd" / "flora-agent.service")],
                              capture_output=True, text=True)
        assert "Unknown key" not in proc.stderr and "Invalid" not in proc.stderr


@pytest.mark.parametrize("script", ["raspberry-pi/install.sh", "jetson/install.sh", "install-common.sh",
                                    "verify-arm64.sh"])
def test_shell_scripts_are_valid(script):
    path = DEVICES / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-x", str(path)], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stdout
    if script != "install-common.sh":  # sourced by the install scripts, not run
        out = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and len(out.stdout.splitlines()) >= 3


def test_device_readmes_exist_and_name_their_install_script():
    for device in ("raspberry-pi", "jetson"):
        text = (DEVICES / device / "README.md").read_text()
        assert f"devices/{device}/install.sh" in text and "flora-agent doctor" in text
        assert Path(DEVICES / device / "install.sh").stat().st_mode & 0o111
