"""pyproject.toml's runtime choice: exactly one onnxruntime package on every platform, and the one
with the training API exactly where onnxruntime-training 1.19.2 publishes wheels."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from flora.export.onnx_export import TESTED_ONNXRUNTIME

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]

#: (sys_platform, platform_machine) -> whether onnxruntime-training-cpu 1.19.2 has a wheel there
#: (checked with `pip download --only-binary=:all: --python-version V --platform P`; none for 3.13)
TRAINING_WHEELS = {
    ("linux", "x86_64"): True,
    ("linux", "aarch64"): False,
    ("linux", "armv7l"): False,
    ("win32", "AMD64"): True,
    ("win32", "ARM64"): False,
    ("darwin", "arm64"): True,  # universal2
    ("darwin", "x86_64"): True,
}
PYTHONS = ["3.8", "3.10", "3.11", "3.12", "3.13"]


def runtimes(extra: str, python: str, platform: str, machine: str) -> list:
    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": platform,
           "platform_machine": machine, "implementation_name": "cpython", "os_name": "posix",
           "platform_system": "", "extra": ""}
    reqs = [Requirement(r) for r in EXTRAS[extra]]
    return sorted(r.name for r in reqs if r.name.startswith("onnxruntime") and (r.marker is None or
                                                                              r.marker.evaluate(env)))


@pytest.mark.parametrize(("python", "where"), list(itertools.product(PYTHONS, sorted(TRAINING_WHEELS))))
def test_the_edge_extra_installs_exactly_one_onnxruntime(python, where):
    wheel = TRAINING_WHEELS[where] and python != "3.13"
    want = ["onnxruntime-training-cpu"] if wheel else ["onnxruntime"]
    assert runtimes("edge", python, *where) == want
    assert runtimes("export", python, *where) == (want if wheel else [])


def test_the_admitted_runtimes_are_the_tested_ones():
    specs = {Requirement(r).name: Requirement(r).specifier for r in EXTRAS["edge"] if r.startswith("onnxruntime")}
    plain, training = specs["onnxruntime"], specs["onnxruntime-training-cpu"]
    oldest, newest = TESTED_ONNXRUNTIME["onnxruntime-oldest"], TESTED_ONNXRUNTIME["onnxruntime"]
    assert str(plain) == f">={oldest}" and newest in plain  # nothing older than the tested floor
    assert TESTED_ONNXRUNTIME["onnxruntime-training"] in training
    assert not training.contains("1.19.0") and not training.contains("1.20.0")


def test_open_clip_stays_below_4_and_the_pinned_version_is_admitted():
    """open_clip's main branch replaces nn.MultiheadAttention, whose fused layout the LoRA code wraps."""
    (spec,) = [Requirement(r).specifier for r in EXTRAS["export"] if Requirement(r).name == "open_clip_torch"]
    pins = dict(line.split("==") for line in (Path(__file__).resolve().parents[1] / "constraints.txt").read_text()
                .splitlines() if "==" in line and not line.startswith("#"))
    assert not spec.contains("4.0.0") and not spec.contains("4.1.0") and spec.contains(pins["open_clip_torch"])
