"""The installed layout: one `flora` namespace holding flora.edge, flora.broker, flora.export and flora.sim, no
bare top-level packages, and a device install (edge and broker) that imports without torch, editable or wheel."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

from .helpers import REPO, install_wheel

#: Imports every module of flora.edge and flora.broker with `import torch` made to fail; prints where
#: flora.edge came from and which bare or heavy top-level packages got loaded.
DEVICE_IMPORTS = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    sys.modules["torch"] = None  # any `import torch` now fails
    import flora.edge, flora.broker
    names = []
    for pkg in (flora.edge, flora.broker):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(info.name)
            names.append(info.name)
    bare = sorted(m for m in sys.modules if m.split(".")[0] in ("edge", "broker", "export", "sim", "bench", "tests"))
    heavy = sorted(m for m, mod in sys.modules.items()
                   if mod is not None and (m.split(".")[0] in ("torch", "open_clip") or m.startswith("flora.export")))
    print(json.dumps({"edge": flora.edge.__file__, "modules": names, "bare": bare, "heavy": heavy}))
    """
)


def _device_imports(python: str, cwd: Path) -> dict:
    proc = subprocess.run([python, "-c", DEVICE_IMPORTS], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_wheel_holds_only_the_flora_namespace(flora_wheel):
    names = zipfile.ZipFile(flora_wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"flora", flora_wheel.name.split("-")[0] + "-" + flora_wheel.name.split("-")[1] + ".dist-info"}
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert {"flora/edge", "flora/edge/trainers", "flora/broker", "flora/broker/strategies", "flora/export",
            "flora/sim"} <= packages
    assert "flora/__init__.py" not in names  # an implicit namespace package
    entry_points = zipfile.ZipFile(flora_wheel).read(next(n for n in names if n.endswith("entry_points.txt")))
    for script in ("flora-export = flora.export:main", "flora-agent = flora.edge:main",
                   "flora-aggregator = flora.broker:main", "flora-sim = flora.sim:main"):
        assert script in entry_points.decode()


def test_the_editable_install_imports_the_device_side_without_torch(tmp_path):
    got = _device_imports(sys.executable, tmp_path)  # this venv holds the project as an editable install
    assert Path(got["edge"]).resolve() == (REPO / "edge" / "__init__.py").resolve()
    assert "flora.edge.agent" in got["modules"] and "flora.broker.aggregator" in got["modules"]
    assert got["bare"] == [] and got["heavy"] == []


def test_the_wheel_install_imports_the_device_side_without_torch(tmp_path, flora_wheel):
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    site = next(env.glob("lib/python*/site-packages"))
    install_wheel(flora_wheel, site)
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "numpy").is_dir())
    (site / "deps.pth").write_text(f"{deps}\n")  # this venv's numpy, paho, ...: a path line, no .pth run there
    got = _device_imports(str(env / "bin" / "python"), tmp_path)
    assert Path(got["edge"]).resolve().is_relative_to(site.resolve())
    assert "flora.edge.agent" in got["modules"] and "flora.broker.aggregator" in got["modules"]
    assert got["bare"] == [] and got["heavy"] == []
