"""Shared fixtures: a private mosquitto broker per test that asks for one, exported clip-tiny bundles, the wheel.

Helpers that are not fixtures live in tests/helpers.py and tests/fakes.py (test modules never import conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flora.broker.mosquitto import MosquittoError, find_mosquitto, start_mosquitto

from .helpers import REPO, export_tiny


@pytest.fixture
def mosquitto_binary():
    """The mosquitto executable; skips the test where it is missing (fails instead under CI)."""
    try:
        return find_mosquitto()
    except MosquittoError as exc:
        if os.environ.get("FLORA_REQUIRE_MOSQUITTO"):  # set by .ci/run: CI must not skip these
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture
def mosquitto(mosquitto_binary, tmp_path):
    """A real mosquitto on a free loopback port, anonymous access, stopped after the test."""
    broker = start_mosquitto(tmp_path / "mosquitto")
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def tiny_text_bundle(tmp_path_factory):
    """clip-tiny, LoRA in the text tower (the default), ort-training artifacts."""
    return export_tiny(tmp_path_factory.mktemp("bundles") / "tiny-text")


@pytest.fixture(scope="session")
def tiny_vision_bundle(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("bundles") / "tiny-vision", tower="vision")


@pytest.fixture(scope="session")
def tiny_both_bundle(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("bundles") / "tiny-both", tower="both",
                       targets=("q", "k", "v", "out", "fc", "proj"))


@pytest.fixture(scope="session")
def tiny_all_bundle(tmp_path_factory):
    """clip-tiny, text tower, both backends (ort-training artifacts and train_step.onnx)."""
    return export_tiny(tmp_path_factory.mktemp("bundles") / "tiny-all", backends=("ort-training", "step"))


@pytest.fixture(scope="session")
def flora_wheel(tmp_path_factory) -> Path:
    """The project built as a wheel (`pip wheel --no-deps`, setuptools from the registry), once per session."""
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--disable-pip-version-check",
                           "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("flora_edge-*.whl")
    return wheel
