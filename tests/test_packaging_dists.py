"""What a newcomer downloads: the licence in both dists' metadata, an sdist that is a complete checkout
(the devices install from it and its tests run), and a wheel with every package and its data.

The non-Python files of a device install (install scripts, systemd unit template, mosquitto template,
example configs) ship in the sdist, not the wheel: the installers create the agent's virtualenv and
install the project into it, so they run before any wheel is installed (README: Install)."""

from __future__ import annotations

import subprocess
import tarfile
import venv
import zipfile
from pathlib import Path
from typing import Dict

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from flora.edge import __version__

from .helpers import REPO, copy_sources, source_files

LICENSE = (REPO / "LICENSE").read_text()
DEVICE_FILES = ["devices/install-common.sh", "devices/raspberry-pi/install.sh", "devices/jetson/install.sh",
                "devices/systemd/flora-agent.service.in", "devices/mosquitto/mosquitto.conf.template",
                "devices/agent.example.toml", "devices/jetson/agent.example.toml"]
OFFLINE = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable")
PACKAGE_DIRS = {"edge": "flora/edge", "broker": "flora/broker", "export": "flora/export", "sim": "flora/sim"}


def sdist_files(sdist: Path) -> Dict[str, bytes]:
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        return {m.name[len(top) + 1:]: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def wheel_files(wheel: Path) -> Dict[str, bytes]:
    with zipfile.ZipFile(wheel) as z:
        return {name: z.read(name) for name in z.namelist()}


def dist_info(files: Dict[str, bytes], name: str) -> bytes:
    (path,) = [p for p in files if p.split("/")[0].endswith(".dist-info") and p.split("/", 1)[1] == name]
    return files[path]


def test_the_licence_is_apache_2_and_lands_in_both_dists(flora_dists):
    assert LICENSE.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in LICENSE and len(LICENSE.splitlines()) > 190  # the full text
    wheel, sdist = wheel_files(flora_dists["wheel"]), sdist_files(flora_dists["sdist"])
    licence_in_wheel = [p for p in wheel if p.endswith("/LICENSE") and ".dist-info/" in p]
    assert len(licence_in_wheel) == 1 and wheel[licence_in_wheel[0]].decode() == LICENSE
    metadata, pkg_info = dist_info(wheel, "METADATA").decode(), sdist["PKG-INFO"].decode()
    for meta in (metadata, pkg_info):
        assert f"Version: {__version__}" in meta.splitlines()  # the one version, flora.edge.__version__
        assert "License-File: LICENSE" in meta.splitlines()
        assert "Classifier: License :: OSI Approved :: Apache Software License" in meta.splitlines()
    assert sdist["LICENSE"].decode() == LICENSE


def test_the_sdist_is_the_whole_project_and_nothing_else(flora_dists):
    names = set(sdist_files(flora_dists["sdist"]))
    generated = {"PKG-INFO", "setup.cfg"} | {n for n in names if n.startswith("flora_edge.egg-info/")}
    assert names - generated == set(source_files())  # no missing file (devices/, docs/...), no build junk
    for name in ["LICENSE", "constraints.txt", "scripts/demo.sh", "scripts/test.sh", "docs/protocol.md",
                 "tests/test_devices.py", *DEVICE_FILES]:
        assert name in names, name


def test_the_wheel_holds_every_package_and_its_data_and_no_device_files(flora_wheel):
    names = set(wheel_files(flora_wheel))
    for folder, installed in PACKAGE_DIRS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            package = init.parent.relative_to(REPO / folder)
            path = f"{installed}/{package.as_posix()}/__init__.py".replace("/./", "/")
            assert path in names, f"{path} missing from the wheel (add the package to tool.setuptools.packages)"
    data = [n for n in source_files() if n.split("/")[0] in PACKAGE_DIRS and not n.endswith(".py")]
    assert data, "no package data found"  # the dashboard's page and its vendored chart library
    missing = [n for n in data if f"{PACKAGE_DIRS[n.split('/')[0]]}/{n.split('/', 1)[1]}" not in names]
    assert not missing, f"package data missing from the wheel (add it to tool.setuptools.package-data): {missing}"
    assert not [n for n in names if n.startswith(("devices", "flora/devices"))]


def test_the_oldest_admitted_setuptools_builds_both_dists_with_the_licence(request, tmp_path):
    """Python 3.8 (JetPack 5) gets setuptools <= 75.3: the pyproject must build with the floor it admits."""
    (requirement,) = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    floor = next(s.version for s in Requirement(requirement).specifier if s.operator == ">=")
    cache = Path(request.config.cache.mkdir(f"flora-setuptools-{floor}"))
    python = cache / "bin" / "python"
    if not (cache / ".complete").exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(cache)
        proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               f"setuptools=={floor}", "wheel==0.41.2"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 and any(sign in proc.stderr for sign in OFFLINE):
            pytest.skip(f"the package registry cannot be reached for setuptools {floor}: {proc.stderr[-500:]}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        (cache / ".complete").write_text(floor)
    src = copy_sources(tmp_path / "src")
    out = tmp_path / "dist"
    code = (f"from setuptools import build_meta as b; import setuptools; print(setuptools.__version__); "
            f"b.build_sdist({str(out)!r}); b.build_wheel({str(out)!r})")
    proc = subprocess.run([str(python), "-c", code], cwd=src, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert Version(proc.stdout.splitlines()[0]) == Version(floor)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    wheel_names, sdist_names = set(wheel_files(wheel)), set(sdist_files(sdist))
    assert any(n.endswith(".dist-info/LICENSE") or n.endswith(".dist-info/licenses/LICENSE") for n in wheel_names)
    assert "License-File: LICENSE" in dist_info(wheel_files(wheel), "METADATA").decode().splitlines()
    assert {"LICENSE", *DEVICE_FILES} <= sdist_names
