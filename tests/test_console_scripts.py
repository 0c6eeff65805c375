"""The four console scripts as a newcomer meets them: each starts with only its own extra installed, says
which extra to install when a dependency is missing, and flora-export loads torch only for real work."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Sequence

import pytest

from flora.edge.errors import run_console_script

#: The top-level modules each extra brings (pyproject.toml); a script must start with the others missing.
EXTRA_MODULES = {
    "edge": {"numpy", "PIL", "paho", "safetensors", "onnxruntime", "prometheus_client"},
    "broker": {"numpy", "paho", "safetensors", "prometheus_client"},
    "export": {"torch", "torchvision", "open_clip", "onnx", "onnxscript", "onnxruntime", "numpy", "safetensors"},
}
EVERY_MODULE = set().union(*EXTRA_MODULES.values()) | {"sklearn", "matplotlib"}
SCRIPTS = {"flora-agent": ("flora.edge", "edge"), "flora-aggregator": ("flora.broker", "broker"),
           "flora-export": ("flora.export", "export")}

#: argv: blocked modules (JSON), the package whose `main` is the console script, the script's name, its arguments
RUN = textwrap.dedent("""
    import importlib, json, sys
    blocked, package, tool, args = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    for name in blocked:
        sys.modules[name] = None  # `import name` now raises ModuleNotFoundError, as where it is not installed
    sys.argv = [tool, *args]
    try:
        code = importlib.import_module(package).main()
    except SystemExit as done:
        code = done.code
    print("RESULT " + json.dumps({"code": code, "torch": sys.modules.get("torch") is not None}))
""")


def console_script(tool: str, argv: Sequence[str], blocked: Sequence[str], cwd: Path) -> dict:
    """Run `tool`'s console-script entry point in a fresh interpreter with the `blocked` modules missing."""
    package = SCRIPTS[tool][0] if tool in SCRIPTS else "flora.sim"
    cmd = [sys.executable, "-c", RUN, json.dumps(sorted(blocked)), package, tool, json.dumps(list(argv))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    result.update(stdout=proc.stdout, stderr=proc.stderr)
    return result


@pytest.mark.parametrize("tool", sorted(SCRIPTS))
@pytest.mark.parametrize("argv", [["--help"], ["--version"]])
def test_each_script_starts_with_only_its_own_extra(tool, argv, tmp_path):
    extra = SCRIPTS[tool][1]
    result = console_script(tool, argv, EVERY_MODULE - EXTRA_MODULES[extra], tmp_path)
    assert result["code"] == 0, result["stderr"][-2000:]
    assert (tool in result["stdout"]) if argv == ["--version"] else ("--help" in result["stdout"])
    assert not result["torch"]


def test_flora_export_without_torch_says_which_extra_to_install(tmp_path):
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    argv = ["clip-tiny", "--classes", str(tmp_path / "classes.txt"), "--out", str(tmp_path / "b"), "--random-init"]
    result = console_script("flora-export", argv, ["torch"], tmp_path)
    assert result["code"] == 2
    assert result["stderr"] == ("flora-export: error: the Python module 'torch' is not installed; flora-export "
                                "needs the 'export' extra: pip install 'flora-edge[export]'\n"), result["stderr"]
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("argv, message", [
    (["clip-huge"], "unknown model 'clip-huge'"),
    (["clip-tiny", "--rank", "0"], "LoRA rank must be >= 1, got 0"),
    (["clip-tiny", "--targets", "q,zz"], "(unknown: 'zz')"),
    (["clip-tiny", "--prompt", "no braces"], "must contain exactly one '{}'"),
    (["clip-tiny", "--rank", "two"], "argument --rank: invalid int value: 'two'"),
])
def test_flora_export_argument_errors_never_load_torch(argv, message, tmp_path):
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    argv = [*argv, "--classes", str(tmp_path / "classes.txt"), "--out", str(tmp_path / "b")]
    result = console_script("flora-export", argv, [], tmp_path)  # torch installed: it must just not load
    assert result["code"] == 2 and message in result["stderr"] and not result["torch"], result["stderr"][-2000:]
    assert "Traceback" not in result["stderr"]


def test_a_missing_module_of_the_project_itself_is_a_traceback_not_an_install_hint(tmp_path, monkeypatch, capsys):
    (tmp_path / "tool_needs_paho.py").write_text("import paho_is_missing_here\n")
    (tmp_path / "tool_broken.py").write_text("import flora.edge.no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert run_console_script("flora-x", "broker", "tool_needs_paho") == 2
    assert capsys.readouterr().err == ("flora-x: error: the Python module 'paho_is_missing_here' is not installed; "
                                       "flora-x needs the 'broker' extra: pip install 'flora-edge[broker]'\n")
    with pytest.raises(ModuleNotFoundError, match=r"flora\.edge\.no_such_module"):
        run_console_script("flora-x", "broker", "tool_broken")


def test_flora_sim_answers_help_without_loading_torch(tmp_path):
    result = console_script("flora-sim", ["--help"], [], tmp_path)
    assert result["code"] == 0 and "--partition" in result["stdout"] and not result["torch"]
