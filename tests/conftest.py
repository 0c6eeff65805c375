"""Shared fixtures: a private mosquitto broker per test that asks for one, exported clip-tiny bundles, the wheel.

Helpers that are not fixtures live in tests/helpers.py and tests/fakes.py (test modules never import conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

from flora.broker.mosquitto import MosquittoError, find_mosquitto, start_mosquitto

from .helpers import PREPROCESS_IMAGES, TINY_PROXY, copy_sources, export_tiny, write_preprocess_images


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
def mosquitto(mosquitto_binary, tmp_path, monkeypatch):
    """A real mosquitto on a free loopback port with a generated password, stopped after the test; the
    credentials are in the environment (FLORA_MQTT_USERNAME/PASSWORD), where every flora client of the test
    and every process it starts finds them."""
    broker = start_mosquitto(tmp_path / "mosquitto")
    for name, value in broker.env.items():
        monkeypatch.setenv(name, value)
    yield broker
    broker.stop()


@pytest.fixture(scope="session", autouse=True)
def proxy_dir(tmp_path_factory):
    """FLORA_PROXY_DIR for the whole session: a fresh folder, so no test reads or writes the user's cached proxy."""
    folder = tmp_path_factory.mktemp("proxy")
    saved = os.environ.get("FLORA_PROXY_DIR")
    os.environ["FLORA_PROXY_DIR"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("FLORA_PROXY_DIR", None)
    else:
        os.environ["FLORA_PROXY_DIR"] = saved


@pytest.fixture(scope="session")
def tiny_proxy(proxy_dir):
    """The clip-proxy preset's checkpoint, from a few-step pre-training, where the preset looks for it."""
    from flora.export.proxy import ProxyConfig, build

    return build(proxy_dir, ProxyConfig(**TINY_PROXY), say=lambda _msg: None)


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory):
    """The preprocessing test images (helpers.write_preprocess_images): name -> path."""
    paths = write_preprocess_images(tmp_path_factory.mktemp("images"))
    assert sorted(paths) == PREPROCESS_IMAGES
    return paths


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
def flora_dists(tmp_path_factory) -> Dict[str, Path]:
    """The project's sdist and the wheel built from that sdist (`python -m build`, isolated, setuptools from
    the registry, from a clean copy of the sources), once per session: {"sdist": ..., "wheel": ...}."""
    src = copy_sources(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (sdist,) = out.glob("flora_edge-*.tar.gz")
    (wheel,) = out.glob("flora_edge-*.whl")
    return {"sdist": sdist, "wheel": wheel}


@pytest.fixture(scope="session")
def flora_wheel(flora_dists) -> Path:
    """The project's wheel (built from its sdist)."""
    return flora_dists["wheel"]
