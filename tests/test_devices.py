"""devices/: the agent's self-test, the example configs, the systemd unit and the install scripts."""

from __future__ import annotations

import ast
import configparser
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest

from flora.broker.mosquitto import free_port
from flora.edge import cli, doctor
from flora.edge.config import apply_config, load_toml

from .helpers import REPO

DEVICES = REPO / "devices"
UNIT_TEMPLATE = DEVICES / "systemd" / "flora-agent.service.in"
AGGREGATOR_UNIT = DEVICES / "systemd" / "flora-aggregator.service.in"


# -- flora-agent doctor ------------------------------------------------------------------------
def run_doctor(capsys, *argv):
    code = cli.main(["doctor", *argv])
    return code, capsys.readouterr().out


def lines_of(out: str) -> Dict[str, str]:
    """The report's lines by check name (the second column)."""
    return {ln.split()[1]: ln for ln in out.splitlines() if ln[:4] in ("OK  ", "WARN", "FAIL", "INFO")}


def publish_round(url: str, federation: str, model_id: str, batch_size: int) -> None:
    from flora.edge.mqtt import BrokerConfig, Connection, make_client
    from flora.edge.protocol import RoundAnnouncement, Topics, TrainConfig

    ann = RoundAnnouncement(3, model_id, "training", TrainConfig(epochs=2, lr=5e-3, batch_size=batch_size), "all",
                            time.time() + 600, "0" * 64, 5)
    cfg = BrokerConfig.from_url(url)
    conn = Connection(cfg, make_client(cfg, "test-aggregator"))
    conn.start(timeout=10)
    try:
        conn.client.publish(Topics(federation).round, ann.to_json(), qos=1, retain=True).wait_for_publish(5)
    finally:
        conn.stop()


def test_doctor_says_ready_and_measures_trainer_and_image_encoder(tiny_all_bundle, mosquitto, capsys):
    code, out = run_doctor(capsys, "--bundle", str(tiny_all_bundle.root), "--batch-size", "16",
                           "--backend", "step", "--broker", mosquitto.url)
    assert code == 0, out
    lines = lines_of(out)
    assert lines["runtime"].startswith("OK") and "onnxruntime" in lines["runtime"]
    assert lines["trainer"].startswith("OK") and lines["trainer"].endswith("step")
    assert "one training step at batch 16" in lines["step"] and "samples/s" in lines["step"]
    assert lines["broker"].startswith("OK") and "accepted an MQTT 5 connection" in lines["broker"]
    assert "no retained round message on flora/default/round" in lines["broker"]
    assert "16, from --batch-size" in lines["batch"]
    # text mode: the step at two batch sizes and the trainer next to the image encoder, each measured
    memory = lines["memory"]
    assert memory.startswith("OK") and "step at batch 4:" in memory and "step at batch 16:" in memory
    assert "trainer + image encoder on 32 images" in memory and "MemAvailable" in memory
    assert "GPU memory" not in memory
    assert "suggest" in lines
    assert out.strip().splitlines()[-1].startswith("VERDICT: ready")


def test_doctor_checks_the_federations_batch_size(tiny_all_bundle, mosquitto, tmp_path, capsys):
    model_id = tiny_all_bundle.manifest.model_id
    publish_round(mosquitto.url, "home", model_id, batch_size=4)
    config = tmp_path / "agent.toml"  # the doctor learns the federation from the agent's config file
    config.write_text(f'federation = "home"\nbroker = "{mosquitto.url}"\nbundle = "{tiny_all_bundle.root}"\n')
    code, out = run_doctor(capsys, "--config", str(config), "--batch-size", "16", "--backend", "step")
    assert code == 0, out
    lines = lines_of(out)
    assert "federation 'home' is at round 3 (training): 2 epoch(s), lr 0.005, batch 4" in lines["broker"]
    assert "4, from the federation's retained round message (round 3" in lines["batch"]
    assert "one training step at batch 4:" in lines["step"]
    assert "federation" not in lines  # same model: no warning

    publish_round(mosquitto.url, "home", "f" * 64, batch_size=8)
    code, out = run_doctor(capsys, "--config", str(config), "--backend", "step")
    lines = lines_of(out)
    assert lines["federation"].startswith("WARN") and "the agent would not train with it" in lines["federation"]
    assert "one training step at batch 8:" in lines["step"]


def test_doctor_fails_on_an_unreachable_broker_and_a_missing_bundle(tiny_text_bundle, tmp_path, capsys):
    code, out = run_doctor(capsys, "--bundle", str(tiny_text_bundle.root),
                           "--broker", f"mqtt://127.0.0.1:{free_port()}")
    assert code == 1
    assert "FAIL  broker" in out and "Connection refused" in out
    assert "32, from --batch-size (the broker did not answer)" in out
    assert out.strip().splitlines()[-1] == "VERDICT: not ready (1 problem)"
    code, out = run_doctor(capsys, "--bundle", str(tmp_path / "nope"))
    assert code == 1 and "FAIL  bundle" in out and "no manifest" in out


def fake_probes(monkeypatch, fixed: float = 100.0, per_sample: float = 10.0, features: float = 0.0) -> List:
    """Replace the child processes by a linear memory cost: fixed + per_sample * batch MiB."""
    seen = []

    def run(spec):
        seen.append(spec)
        peak = features if spec.features else fixed + per_sample * spec.batch
        return {"trainer": spec.backend, "batch": spec.batch, "seconds": 0.01, "peak_mb": peak}

    monkeypatch.setattr(doctor, "run_probe", run)
    monkeypatch.setattr(doctor, "own_memory_mb", lambda: 0.0)
    return seen


def memory_report(monkeypatch, capsys, bundle, available, *argv):
    monkeypatch.setattr(doctor, "available_memory_mb", lambda: available)
    code, out = run_doctor(capsys, "--bundle", str(bundle.root), "--backend", "step", *argv)
    return code, lines_of(out), out


def test_memory_check_warns_and_fails_when_memory_is_short(tiny_all_bundle, monkeypatch, capsys):
    specs = fake_probes(monkeypatch, fixed=100, per_sample=10, features=150)
    # batch 32: the step needs 420 MiB, the image encoder phase 150 MiB
    code, lines, out = memory_report(monkeypatch, capsys, tiny_all_bundle, 10000.0, "--batch-size", "32")
    assert code == 0 and lines["memory"].startswith("OK") and "agent peak 420 MiB at batch 32" in lines["memory"]
    assert [(s.batch, s.features) for s in specs] == [(32, False), (8, False), (32, True)]
    code, lines, out = memory_report(monkeypatch, capsys, tiny_all_bundle, 500.0, "--batch-size", "32")
    assert code == 0 and lines["memory"].startswith("WARN") and "less than 20 % to spare" in lines["memory"]
    assert out.strip().splitlines()[-1] == "VERDICT: ready (1 warning)"
    code, lines, out = memory_report(monkeypatch, capsys, tiny_all_bundle, 400.0, "--batch-size", "32")
    assert code == 1 and lines["memory"].startswith("FAIL") and lines["memory"].endswith("does not fit")
    assert "largest batch within 80 % of the available memory: 16" in lines["suggest"]
    # the image encoder phase alone does not fit
    fake_probes(monkeypatch, fixed=100, per_sample=10, features=900)
    code, lines, out = memory_report(monkeypatch, capsys, tiny_all_bundle, 850.0, "--batch-size", "8")
    assert code == 1 and "agent peak 900 MiB" in lines["memory"]
    assert "no batch size fits" in lines["suggest"] and "the image encoder phase alone" in lines["suggest"]


def test_suggested_batch_responds_to_available_memory(tiny_all_bundle, monkeypatch, capsys):
    fake_probes(monkeypatch, fixed=100, per_sample=10)
    suggestions = {}
    for available in (250.0, 500.0, 1000.0, 4000.0):
        _, lines, _ = memory_report(monkeypatch, capsys, tiny_all_bundle, available, "--batch-size", "8")
        suggestions[available] = int(re.search(r"available memory: (\d+)", lines["suggest"]).group(1))
    # 0.8 * available - 100 MiB fixed, 10 MiB per sample: 10, 30, 70, 310 samples
    assert suggestions == {250.0: 8, 500.0: 16, 1000.0: 64, 4000.0: 256}
    assert "10.00 MiB per sample" in lines["suggest"]
    fake_probes(monkeypatch, fixed=100, per_sample=0.01)  # allocator noise, not a cost
    _, lines, _ = memory_report(monkeypatch, capsys, tiny_all_bundle, 4000.0, "--batch-size", "8")
    assert "memory does not limit the batch size: batches up to 4096 fit" in lines["suggest"]
    assert "below the measurement resolution" in lines["suggest"]


def test_memory_notes_gpu_and_unmeasurable_cases(tiny_all_bundle, monkeypatch, capsys):
    fake_probes(monkeypatch)
    _, lines, _ = memory_report(monkeypatch, capsys, tiny_all_bundle, 4000.0, "--providers", "cuda,cpu")
    assert "GPU memory is not counted" in lines["memory"]
    _, lines, _ = memory_report(monkeypatch, capsys, tiny_all_bundle, None)
    assert lines["memory"].startswith("WARN") and "free memory unknown" in lines["memory"]

    def cannot_spawn(spec):
        raise OSError("spawning is not allowed here")

    monkeypatch.setattr(doctor, "run_probe", cannot_spawn)  # the step still runs, in-process
    code, lines, _ = memory_report(monkeypatch, capsys, tiny_all_bundle, 4000.0, "--batch-size", "4")
    assert code == 0 and lines["step"].startswith("OK") and "one training step at batch 4" in lines["step"]
    assert lines["memory"].startswith("WARN") and "cannot be measured: no child process could be started" \
        in lines["memory"]

    def killed(spec):
        raise doctor.ProbeError(f"{spec.describe()} was killed by signal 9 (SIGKILL)", killed="SIGKILL")

    monkeypatch.setattr(doctor, "run_probe", killed)
    code, lines, _ = memory_report(monkeypatch, capsys, tiny_all_bundle, 4000.0)
    assert code == 1 and lines["memory"].startswith("FAIL") and "out-of-memory killer" in lines["memory"]


def test_probe_child_reports_its_peak_its_errors_and_a_kill(tiny_all_bundle, monkeypatch):
    spec = doctor.ProbeSpec(str(tiny_all_bundle.root), "step", 8)
    result = doctor.run_probe(spec)
    assert result["trainer"] == "step" and result["batch"] == 8 and result["peak_mb"] > 20
    with pytest.raises(doctor.ProbeError) as err:
        doctor.run_probe(doctor.ProbeSpec(str(tiny_all_bundle.root), "step", 8, providers=["nonesuch"]))
    assert err.value.phase == "trainer" and "nonesuch" in str(err.value)
    monkeypatch.setattr(doctor, "_probe_command", lambda spec: ["sh", "-c", "kill -9 $$"])
    with pytest.raises(doctor.ProbeError) as err:
        doctor.run_probe(spec)
    assert err.value.killed == "SIGKILL" and "training step probe at batch 8" in str(err.value)


def test_memory_model_and_suggestion():
    model = doctor.memory_model(8, 180.0, 32, 420.0)  # 10 MiB per sample, 100 MiB fixed
    assert model.measured and model.per_sample_mb == pytest.approx(10) and model.fixed_mb == pytest.approx(100)
    assert doctor.suggest_batch(model, 1000.0) == 64  # 0.8 * 1000 = 800 -> 70 samples
    assert doctor.suggest_batch(model, 130.0) == 0  # 104 MiB: not even one sample
    assert doctor.memory_model(8, 180.0, 32, 420.0, features_mb=900.0).need(1) == 900.0
    flat = doctor.memory_model(8, 180.0, 32, 181.0)  # 1 MiB over 24 samples: below the resolution
    assert not flat.measured and flat.need(32) == pytest.approx(181.0)
    assert flat.per_sample_mb == pytest.approx(doctor.RESOLUTION_MB / 24)  # an upper bound
    assert doctor.probe_batches(1) == (1, 2) and doctor.probe_batches(32) == (8, 32)


def test_doctor_constants_follow_the_agent():
    from flora.edge.agent import AgentConfig

    assert AgentConfig.feature_batch_size == doctor.FEATURE_BATCH


# -- configs and the systemd unit --------------------------------------------------------------
@pytest.mark.parametrize("path", ["agent.example.toml", "jetson/agent.example.toml"])
def test_example_agent_configs_use_only_known_keys(path):
    parser = cli.build_parser()
    args = parser.parse_args(["run"])
    config = load_toml(DEVICES / path)
    merged = apply_config(parser.commands["run"], args, [], config)
    assert merged.client_id and merged.broker.startswith("mqtts://") and merged.tls_ca
    assert isinstance(merged.bundle, Path) and merged.providers in (None, ["cuda", "cpu"])
    assert "password" not in config  # secrets belong in agent.env


def sh(script: str, env: Dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run bash with devices/install-common.sh sourced."""
    full = f'set -euo pipefail; . "{DEVICES}/install-common.sh"; {script}'
    return subprocess.run(["bash", "-c", full], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def read_unit(text: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(text)
    return unit


@pytest.fixture
def fakes(tmp_path):
    """A bin folder of fake system commands that log their arguments; returns (env, log path)."""
    bin_dir, log = tmp_path / "fakebin", tmp_path / "calls.log"
    bin_dir.mkdir()
    scripts = {
        "apt-get": 'exit 0',
        "useradd": 'exit 0', "usermod": 'exit 0', "chown": 'exit 0', "systemctl": 'exit 0',
        "id": 'case "$1" in -u) echo 0 ;; -un) echo root ;; *) exit 1 ;; esac',
        "runuser": 'while [ "$1" != "--" ]; do shift; done; shift; exec "$@"',
        # python3 -m venv DIR: a venv whose pip logs, whose python has onnxruntime and no torch
        "python3": '[ "$1 $2" = "-m venv" ] || exit 9\nmkdir -p "$3/bin"\n'
                   f'cp "{bin_dir}/fake-pip" "$3/bin/pip"\ncp "{bin_dir}/fake-python" "$3/bin/python"\n'
                   f'cp "{bin_dir}/fake-agent" "$3/bin/flora-agent"',
        "fake-pip": 'exit 0',
        "fake-python": 'case "$*" in *"import torch"*) exit 1 ;;\n'
                       '  *onnxruntime*) echo "onnxruntime 1.99 providers [CPU]" ;; esac',
        "fake-agent": 'echo "password=${FLORA_MQTT_PASSWORD:-}"\n'
                      '[ -z "${FAKE_DOCTOR_PEAK:-}" ] || '
                      'echo "OK   memory  agent peak $FAKE_DOCTOR_PEAK MiB at batch 32"\n'
                      'echo "VERDICT: ready"\nexit "${FAKE_DOCTOR_RC:-0}"',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\necho "$(basename "$0") $* [uid-cwd $(pwd)]" >> "{log}"\n{body}\n')
        path.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return env, log


def install_env(env: Dict[str, str], root: Path) -> Dict[str, str]:
    paths = {"FLORA_PREFIX": root / "opt", "FLORA_ETC": root / "etc", "FLORA_VAR": root / "var",
             "FLORA_UNIT_DIR": root / "units"}
    return {**env, **{k: str(v) for k, v in paths.items()},
            "PREFIX": str(paths["FLORA_PREFIX"]), "ETC": str(paths["FLORA_ETC"]), "VAR": str(paths["FLORA_VAR"]),
            "SRC": str(REPO)}


def test_unit_is_rendered_with_the_install_paths(tmp_path, fakes):
    env = install_env(fakes[0], tmp_path)
    agent = Path(env["PREFIX"]) / "venv" / "bin" / "flora-agent"
    agent.parent.mkdir(parents=True)
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o755)
    proc = sh(f'render_unit "{UNIT_TEMPLATE}"', {**env, "VAR": "/var/lib/flora-test"})
    assert proc.returncode == 0, proc.stderr
    assert not re.search(r"@[A-Z_]+@", proc.stdout)  # every placeholder filled
    service = read_unit(proc.stdout)["Service"]
    assert service["ExecStart"] == f"{agent} run --config {env['ETC']}/agent.toml"
    assert service["EnvironmentFile"] == f"-{env['ETC']}/agent.env"
    assert service["User"] == "flora" and service["Restart"] == "on-failure"
    assert service["StateDirectory"] == "flora-test" and service["WorkingDirectory"] == "/var/lib/flora-test"
    assert service["ReadWritePaths"] == "/var/lib/flora-test" and service["StandardOutput"] == "journal"
    # a config error is not retried: the status must be what flora-agent exits with on one
    assert cli.main(["run"]) == 2  # missing --bundle, --data, ...
    assert service["RestartPreventExitStatus"].split() == ["2"]
    if shutil.which("systemd-analyze"):
        unit_file = tmp_path / "flora-agent.service"
        unit_file.write_text(proc.stdout)
        check = subprocess.run(["systemd-analyze", "verify", str(unit_file)], capture_output=True, text=True)
        assert check.returncode == 0 and not re.search(r"Unknown|Invalid|Failed|not executable", check.stderr), \
            check.stderr
    outside = sh(f'render_unit "{UNIT_TEMPLATE}"', env)  # VAR not under /var/lib: no StateDirectory
    service = read_unit(outside.stdout)["Service"]
    assert "StateDirectory" not in service and service["ReadWritePaths"] == env["VAR"]
    bad = sh("check_paths", {**env, "PREFIX": "/opt/my flora"})
    assert bad.returncode == 2 and "use only letters" in bad.stderr


#: What every rendered unit must say (the hardening `systemd-analyze security` scores), and the worst
#: exposure it may score (the unhardened agent unit scored 8.6 "EXPOSED").
HARDENING = {"NoNewPrivileges": "true", "ProtectSystem": "strict", "ProtectKernelTunables": "true",
             "ProtectKernelModules": "true", "ProtectControlGroups": "true", "LockPersonality": "true",
             "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK", "CapabilityBoundingSet": "",
             "RestrictNamespaces": "true", "SystemCallArchitectures": "native", "SystemCallErrorNumber": "EPERM"}
MAX_EXPOSURE = 2.5


def systemd_analyze() -> str:
    """The systemd-analyze binary (apt-get install systemd); skips only where it cannot be had."""
    found = shutil.which("systemd-analyze")
    if not found:
        if os.environ.get("FLORA_REQUIRE_SYSTEMD_ANALYZE"):  # set by .ci/run, which installs it
            pytest.fail("systemd-analyze is missing: apt-get install -y systemd")
        pytest.skip("systemd-analyze is not installed (apt-get install -y systemd)")
    return found


def rendered(template: Path, env: Dict[str, str], tmp_path: Path, executable: str, **extra: str) -> Path:
    """`render_unit template` with a fake executable at ExecStart, written to tmp_path."""
    exe = Path(env["PREFIX"]) / "venv" / "bin" / executable
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    proc = sh(f'render_unit "{template}"', {**env, "VAR": "/var/lib/flora-test", **extra})
    assert proc.returncode == 0, proc.stderr
    assert not re.search(r"@[A-Z_]+@", proc.stdout)  # every placeholder filled
    out = tmp_path / template.name[: -len(".in")]
    out.write_text(proc.stdout)
    return out


@pytest.mark.parametrize("template, executable", [(UNIT_TEMPLATE, "flora-agent"),
                                                  (AGGREGATOR_UNIT, "flora-aggregator")])
def test_units_are_hardened_verified_and_score_ok(template, executable, tmp_path, fakes):
    analyze = systemd_analyze()
    env = install_env(fakes[0], tmp_path)
    unit_file = rendered(template, env, tmp_path, executable, MEMORY_MAX="1400M")
    service = read_unit(unit_file.read_text())["Service"]
    assert {k: service.get(k) for k in HARDENING} == HARDENING
    assert service["MemoryMax"] == "1400M" and service["RestartPreventExitStatus"] == "2"
    filters = [ln.split("=", 1)[1] for ln in unit_file.read_text().splitlines() if ln.startswith("SystemCallFilter=")]
    assert filters[0] == "@system-service" and "@privileged" in filters[1] and filters[1].startswith("~")
    if executable == "flora-agent":  # a Jetson's GPU device nodes must stay reachable
        assert "PrivateDevices" not in service and "DevicePolicy" not in service
    else:
        assert service["PrivateDevices"] == "true"
    check = subprocess.run([analyze, "verify", str(unit_file)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and not re.search(r"Unknown|Invalid|Failed|not executable", check.stderr), \
        check.stderr
    score = subprocess.run([analyze, "security", "--offline=yes", str(unit_file)], capture_output=True, text=True,
                           timeout=60)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", score.stdout + score.stderr)
    assert found, score.stdout[-2000:] + score.stderr[-2000:]
    assert float(found.group(1)) <= MAX_EXPOSURE, score.stdout[-3000:]


def test_the_self_test_sets_memory_max_from_the_measured_peak(tmp_path, fakes):
    env = install_env(fakes[0], tmp_path)
    Path(env["FLORA_UNIT_DIR"]).mkdir(parents=True)
    Path(env["VAR"]).mkdir(parents=True)
    unit = Path(env["FLORA_UNIT_DIR"]) / "flora-agent.service"
    agent = Path(env["PREFIX"]) / "venv" / "bin" / "flora-agent"
    agent.parent.mkdir(parents=True)
    shutil.copy(tmp_path / "fakebin" / "fake-agent", agent)
    assert sh("install_unit", env).returncode == 0
    assert read_unit(unit.read_text())["Service"]["MemoryMax"] == "80%"  # before any measurement
    proc = sh("self_test /b --batch-size 32", {**env, "FAKE_DOCTOR_PEAK": "700"})
    assert proc.returncode == 0 and "MemoryMax=1400M" in proc.stdout, proc.stdout + proc.stderr
    assert read_unit(unit.read_text())["Service"]["MemoryMax"] == "1400M"
    proc = sh("self_test /b", {**env, "FAKE_DOCTOR_PEAK": "100", "FAKE_DOCTOR_RC": "1"})
    assert proc.returncode == 1  # the doctor's verdict is kept; a small peak still gets 512 MiB
    assert read_unit(unit.read_text())["Service"]["MemoryMax"] == "512M"


def make_bundle(path: Path, content: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(content)
    (path / "weights.onnx").write_text(content * 3)
    return path


def test_install_bundle_replaces_atomically_and_never_deletes_its_source(tmp_path, fakes):
    env, log = fakes
    env = install_env(env, tmp_path)
    (Path(env["VAR"]) / "bundles").mkdir(parents=True)
    src = make_bundle(tmp_path / "src" / "clip", "v1")
    installed = Path(env["VAR"]) / "bundles" / "clip"

    def install(folder, extra_env=None):
        return sh(f'install_bundle "{folder}"', {**env, **(extra_env or {})})

    proc = install(src)
    assert proc.returncode == 0 and proc.stdout.strip() == str(installed.resolve()), proc.stderr
    assert (installed / "manifest.json").read_text() == "v1"
    assert "chown -R flora:flora" in log.read_text()
    (src / "weights.onnx").unlink()
    (src / "manifest.json").write_text("v2")
    assert install(src).returncode == 0
    assert sorted(p.name for p in installed.iterdir()) == ["manifest.json"]  # replaced, not merged
    assert (installed / "manifest.json").read_text() == "v2"
    assert sorted(p.name for p in installed.parent.iterdir()) == ["clip"]  # no temporary folders left

    proc = install(installed)  # the installed bundle itself: copied onto nothing, still there
    assert proc.returncode == 0 and "not copying it onto itself" in proc.stderr
    assert (installed / "manifest.json").read_text() == "v2"

    failing_cp = tmp_path / "failbin"
    failing_cp.mkdir()
    (failing_cp / "cp").write_text("#!/bin/sh\nexit 1\n")
    (failing_cp / "cp").chmod(0o755)
    (src / "manifest.json").write_text("v3")
    proc = install(src, {"PATH": f"{failing_cp}:{env['PATH']}"})
    assert proc.returncode == 1 and "is unchanged" in proc.stderr
    assert (installed / "manifest.json").read_text() == "v2"
    assert sorted(p.name for p in installed.parent.iterdir()) == ["clip"]

    nested = make_bundle(installed / "clip", "inner")  # a source inside the installed copy
    proc = install(nested)
    assert proc.returncode == 2 and nested.exists() and "copy it elsewhere first" in proc.stderr
    proc = install(tmp_path / "src")  # no manifest.json
    assert proc.returncode == 2 and "is not a bundle" in proc.stderr


def run_installer(device: str, env: Dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DEVICES / device / "install.sh"), *argv], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_pi_installer_with_fake_system_commands(tmp_path, fakes):
    env, log = fakes
    env = install_env(env, tmp_path)
    etc, var = Path(env["FLORA_ETC"]), Path(env["FLORA_VAR"])
    etc.mkdir()
    (etc / "agent.env").write_text("FLORA_MQTT_PASSWORD=s3cret\n")
    bundle = make_bundle(tmp_path / "clip-tiny", "{}")
    proc = run_installer("raspberry-pi", env, "--bundle", str(bundle))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text()
    assert "useradd --system" in calls and f"pip install -q {REPO}[edge]" in calls
    assert re.search(r"runuser -u flora -- \S+/opt/venv/bin/python -c import onnxruntime", calls)
    doctor_call = f"runuser -u flora -- {env['FLORA_PREFIX']}/venv/bin/flora-agent doctor --bundle " \
                  f"{(var / 'bundles' / 'clip-tiny').resolve()} --batch-size 32 [uid-cwd {var}]"
    assert doctor_call in calls
    assert "onnxruntime 1.99" in proc.stdout and "password=s3cret" in proc.stdout  # agent.env reached the doctor
    unit = read_unit((Path(env["FLORA_UNIT_DIR"]) / "flora-agent.service").read_text())["Service"]
    assert unit["ExecStart"].startswith(f"{env['FLORA_PREFIX']}/venv/bin/flora-agent run --config {etc}/agent.toml")
    config = load_toml(etc / "agent.toml")
    assert config["data"] == f"{var}/images" and config["tls_ca"] == f"{etc}/ca.crt"
    assert (etc / "agent.env").read_text() == "FLORA_MQTT_PASSWORD=s3cret\n"  # kept
    assert (var / "bundles" / "clip-tiny" / "manifest.json").exists()

    (etc / "agent.env").unlink()
    proc = run_installer("raspberry-pi", {**env, "FAKE_DOCTOR_RC": "1"}, "--bundle", str(bundle))
    assert proc.returncode == 1 and "the self-test says the device is not ready" in proc.stderr
    assert stat.S_IMODE((etc / "agent.env").stat().st_mode) == 0o600
    log.write_text("")
    proc = run_installer("raspberry-pi", env)  # no bundle: still checks that onnxruntime imports
    assert proc.returncode == 0 and "onnxruntime 1.99" in proc.stdout and "doctor" not in log.read_text()


def test_jetson_installer_pins_numpy_with_the_wheel(tmp_path, fakes):
    env, log = fakes
    env = install_env(env, tmp_path)
    wheel = tmp_path / "onnxruntime_gpu-1.18.0-cp38-cp38-linux_aarch64.whl"
    wheel.write_text("")
    bundle = make_bundle(tmp_path / "clip-tiny", "{}")
    proc = run_installer("jetson", env, "--ort-wheel", str(wheel), "--bundle", str(bundle))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text()
    assert f"pip install -q {wheel} numpy>=1.21,<2" in calls
    assert "--backend step --providers cuda,cpu --batch-size 32" in calls and "usermod -aG video flora" in calls
    assert load_toml(Path(env["FLORA_ETC"]) / "agent.toml")["providers"] == ["cuda", "cpu"]


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


# -- Python 3.8 on the devices -----------------------------------------------------------------
def _needs_future_annotations(tree: ast.Module) -> bool:
    """Anything beyond a docstring and plain assignments (a package __init__ of constants needs none)."""
    return any(not isinstance(node, (ast.Expr, ast.Assign, ast.ImportFrom, ast.Import)) for node in tree.body) or \
        any(isinstance(node, ast.AnnAssign) for node in ast.walk(tree))


BUILTIN_GENERICS = {"list", "dict", "tuple", "set", "frozenset", "type"}


def _runtime_builtin_generics(tree: ast.Module) -> List[int]:
    """Lines that subscript a builtin (`list[int]`) outside annotations: a TypeError before Python 3.9."""
    in_annotations = set()
    for node in ast.walk(tree):
        for ann in (getattr(node, "annotation", None), getattr(node, "returns", None)):
            if ann is not None:
                in_annotations.update(id(sub) for sub in ast.walk(ann))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
            and node.value.id in BUILTIN_GENERICS and id(node) not in in_annotations]


@pytest.mark.parametrize("package", ["edge", "broker", "devices"])
def test_device_code_parses_as_python_3_8(package):
    """Jetsons run Python 3.8 (JetPack 5) and 3.10; CI has only 3.11, so check the syntax here (devices/: the
    programs verify-arm64.sh runs under emulation)."""
    problems = []
    for path in sorted((REPO / package).rglob("*.py")):
        src, name = path.read_text(), path.relative_to(REPO)
        try:
            tree = ast.parse(src, filename=str(path), feature_version=(3, 8))
        except SyntaxError as exc:
            problems.append(f"{name}:{exc.lineno}: not Python 3.8 syntax: {exc.msg}")
            continue
        future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                     and any(a.name == "annotations" for a in n.names) for n in tree.body)
        if not future and _needs_future_annotations(tree):
            problems.append(f"{name}: no `from __future__ import annotations`")
        problems += [f"{name}:{line}: builtin generic outside an annotation"
                     for line in _runtime_builtin_generics(tree)]
    assert not problems, "\n".join(problems)


def test_the_python_3_8_check_can_fail():
    walrus_ok = ast.parse("if (n := 1):\n    pass\n", feature_version=(3, 8))
    assert walrus_ok
    with pytest.raises(SyntaxError):
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=(3, 8))
    assert _runtime_builtin_generics(ast.parse("x = list[int]\ndef f(a: list[int]) -> dict[str, int]: ...\n")) == [1]
    assert _needs_future_annotations(ast.parse("def f(): pass\n"))
    assert not _needs_future_annotations(ast.parse('"""doc"""\n__version__ = "1"\n'))


def test_the_jetson_installer_installs_the_edge_extra():
    """install.sh lists the edge extra by hand (onnxruntime must come from NVIDIA's wheel): keep them in sync."""
    import tomllib
    from packaging.requirements import Requirement

    script = (DEVICES / "jetson" / "install.sh").read_text()
    listed = {Requirement(spec.split(";")[0]).name: Requirement(spec) for spec in
              re.findall(r'"([a-z][a-z0-9_-]*[<>=][^"]*)"', script)}
    extra = tomllib.loads((DEVICES.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]["edge"]
    wanted = {Requirement(spec).name: Requirement(spec) for spec in extra}
    assert set(listed) == set(wanted) - {"onnxruntime-training-cpu"}
    for name in set(listed) - {"numpy"}:  # numpy is pinned below 2 for NVIDIA's wheels (--numpy)
        assert listed[name].specifier == wanted[name].specifier, name
