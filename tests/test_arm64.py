"""The edge stack on 64-bit Arm: devices/verify-arm64.sh under qemu user-mode emulation.

Opt-in (it downloads about 60 MB of Debian arm64 packages and aarch64 wheels on first use):

    FLORA_RUN_ARM64=1 pytest -m arm64 tests/test_arm64.py

The cache goes to $FLORA_ARM64_CACHE, else to pytest's cache directory (.pytest_cache/d/flora-arm64).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from .helpers import export_tiny

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "devices" / "verify-arm64.sh"
EMULATION_IMPOSSIBLE = 77  # the script's exit status when this machine cannot emulate aarch64
RESULT_PREFIX = "FLORA_ARM64_RESULT "
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def arm64_cache(request, tmp_path_factory):
    """Where the emulated rootfs and wheels are cached; skips unless FLORA_RUN_ARM64=1."""
    if os.environ.get("FLORA_RUN_ARM64") != "1":
        pytest.skip(
            "aarch64 emulation check is opt-in: set FLORA_RUN_ARM64=1 (slow; downloads ~60 MB of "
            "Debian arm64 packages and aarch64 wheels on first use)"
        )
    if shutil.which("bash") is None:
        pytest.fail("bash is needed to run devices/verify-arm64.sh")
    cache = os.environ.get("FLORA_ARM64_CACHE")
    if not cache:
        pytest_cache = getattr(request.config, "cache", None)
        cache = str(pytest_cache.mkdir("flora-arm64") if pytest_cache else tmp_path_factory.mktemp("flora-arm64"))
    return cache


@pytest.fixture(scope="module")
def arm64_run(arm64_cache):
    """Run the default verification once for the module; (completed process, parsed result or None)."""
    cache = arm64_cache
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        env={**os.environ, "FLORA_ARM64_CACHE": cache},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode == EMULATION_IMPOSSIBLE:
        reasons = [ln for ln in proc.stderr.splitlines() if "EMULATION IMPOSSIBLE" in ln]
        pytest.skip(reasons[-1] if reasons else f"verify-arm64.sh exited {EMULATION_IMPOSSIBLE}: {proc.stderr[-500:]}")
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
    return proc, result


def _report(proc) -> str:
    verdicts = [ln for ln in proc.stdout.splitlines() if not ln.startswith(RESULT_PREFIX)]
    return f"exit {proc.returncode}\n--- stdout\n" + "\n".join(verdicts) + "\n--- stderr (end)\n" + proc.stderr[-4000:]


def _result(arm64_run) -> dict:
    proc, result = arm64_run
    assert result is not None, "verify-arm64.sh printed no FLORA_ARM64_RESULT line\n" + _report(proc)
    return result


@pytest.mark.arm64
def test_emulated_python_is_aarch64(arm64_run):
    result = _result(arm64_run)
    assert result["machine"] == "aarch64", _report(arm64_run[0])
    assert result["python"].startswith("3.11."), result["python"]
    assert result["ort_training"] is False  # plain onnxruntime: onnxruntime-training has no aarch64 wheel
    assert "CPUExecutionProvider" in result["providers"]


@pytest.mark.arm64
def test_tiny_model_matches_host(arm64_run):
    tiny = _result(arm64_run).get("tiny_model")
    assert tiny, "the emulated tiny-model check did not run\n" + _report(arm64_run[0])
    model = base64.b64decode(tiny["onnx_base64"])
    x = np.asarray(tiny["input"], dtype=np.float32)
    arm = np.asarray(tiny["output"], dtype=np.float32)
    try:
        import onnxruntime as ort
    except ImportError:  # no runtime on the host: compare with the float64 reference instead
        ort = None
    if ort is not None:
        host = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    else:
        w, b = np.asarray(tiny["W"], np.float64), np.asarray(tiny["B"], np.float64)
        z = x.astype(np.float64) @ w + b
        host = np.exp(z - z.max(axis=1, keepdims=True))
        host /= host.sum(axis=1, keepdims=True)
    assert arm.shape == host.shape == (4, 8)
    err = float(np.abs(arm - host).max())
    assert err <= TOLERANCE, f"aarch64 output differs from the host's by {err:.3g} (> {TOLERANCE})"


@pytest.mark.arm64
def test_default_verification_passes(arm64_run):
    proc, _ = arm64_run
    if proc.returncode != 0 or "VERDICT: PASS" not in proc.stdout:
        pytest.fail("devices/verify-arm64.sh did not pass:\n" + _report(proc), pytrace=False)


def test_the_emulated_programs_are_python_files_of_the_repository():
    """verify-arm64.sh runs devices/arm64/*.py (seen by ruff and the Python 3.8 check), no embedded heredoc."""
    text = SCRIPT.read_text()
    programs = dict(re.findall(r"^(VERIFY_PY|TRAIN_PY)=\$SCRIPT_DIR/(\S+)$", text, re.M))
    assert programs == {"VERIFY_PY": "arm64/verify_default.py", "TRAIN_PY": "arm64/train_check.py"}
    for path in programs.values():
        source = (SCRIPT.parent / path).read_text()
        assert 'if __name__ == "__main__":' in source and "from __future__ import annotations" in source
    assert "<<'PYEOF'" not in text and "PYEOF" not in text
    assert "train_round(" in (SCRIPT.parent / programs["TRAIN_PY"]).read_text()  # the project's own round loop


def test_requirements_match_pyproject():
    """The wheel list in verify-arm64.sh is the `edge` extra evaluated for aarch64 + CPython 3.11."""
    try:
        import tomllib
    except ImportError:
        tomllib = pytest.importorskip("tomli")
    packaging_requirements = pytest.importorskip("packaging.requirements")

    text = SCRIPT.read_text()
    m = re.search(r"^EDGE_REQUIREMENTS=\((.*)\)$", text, re.M)
    assert m, "EDGE_REQUIREMENTS=(...) not found in verify-arm64.sh"
    script = sorted(re.findall(r'"([^"]+)"', m.group(1)))

    env = {
        "platform_machine": "aarch64",
        "python_version": "3.11",
        "python_full_version": "3.11.2",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "edge",
    }
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = []
    for spec in pyproject["project"]["optional-dependencies"]["edge"]:
        req = packaging_requirements.Requirement(spec)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            wanted.append(str(req))
    normalized = sorted(str(packaging_requirements.Requirement(s)) for s in script)
    assert normalized == sorted(wanted), (
        f"verify-arm64.sh installs {normalized}, pyproject's edge extra wants {sorted(wanted)}"
    )


@pytest.mark.arm64
def test_agent_doctor_and_step_training_on_aarch64(arm64_run, arm64_cache, tmp_path):
    """`verify-arm64.sh --bundle`: the agent's self-test and a short `step`-backend round of clip-tiny through the
    project's round loop (train_round), emulated; the host runs the same round and must train the same batches
    to the same losses and adapter."""
    from flora.edge.features import image_features
    from flora.edge.trainers import open_trainer
    from flora.edge.training import LocalData, train_round


    proc, _ = arm64_run
    if proc.returncode != 0:
        pytest.fail("the default aarch64 verification failed first:\n" + _report(proc), pytrace=False)
    bundle = export_tiny(tmp_path / "tiny-step", backends=("step",))
    out = tmp_path / "arm-out"
    run = subprocess.run(["bash", str(SCRIPT), "--bundle", str(bundle.root), "--out", str(out)],
                         env={**os.environ, "FLORA_ARM64_CACHE": arm64_cache}, cwd=ROOT, capture_output=True,
                         text=True, timeout=1800)
    report = _report(run)
    assert run.returncode == 0 and "VERDICT: PASS" in run.stdout, report
    doctor = [ln for ln in run.stdout.splitlines() if ln.startswith("  doctor| ")]
    assert any("aarch64" in ln for ln in doctor) and "  doctor| OK    trainer    step" in doctor, report
    assert any("trainer + image encoder" in ln for ln in doctor) and "  doctor| VERDICT: ready" in doctor, report
    assert "PASS doctor:" in run.stdout and "PASS train:" in run.stdout, report
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("FLORA_ARM64_TRAIN "))
    result = json.loads(line.split(" ", 1)[1])
    assert result["machine"] == "aarch64" and result["trainer"] == "step" and result["backends"] == ["step"]
    assert result["loss_after"] < result["loss_before"]

    saved = np.load(out / "train.npz")
    pngs = sorted(out.glob("class*-*.png"))
    assert len(pngs) == result["images"] == len(saved["labels"])
    host_features = image_features(bundle, pngs, None, batch_size=8)  # the image encoder, on the host
    np.testing.assert_allclose(saved["inputs"], host_features, rtol=1e-4, atol=1e-5)
    host = open_trainer(bundle, "step")
    host.set_lr(result["lr"])
    host_batches, host_losses = [], []
    train_round(host, LocalData(saved["labels"], features=saved["inputs"]), epochs=result["epochs"],
                batch_size=result["batch"], seed=result["seed"],
                on_step=lambda idx, step: (host_batches.append(idx.tolist()), host_losses.append(step.loss)))
    assert result["steps"] == result["epochs"] * -(-result["images"] // result["batch"]) == len(host_batches)
    assert host_batches == result["batches"]  # the same shuffled batches on both machines
    np.testing.assert_allclose(result["losses"], host_losses, rtol=1e-4)
    np.testing.assert_allclose(saved["losses"], host_losses, rtol=1e-4)
    for name, value in host.get_adapter().items():
        np.testing.assert_allclose(saved[f"adapter/{name}"], value, rtol=1e-3, atol=1e-5, err_msg=name)
