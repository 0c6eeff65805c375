"""Shared fixtures: a private mosquitto broker per test that asks for one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.mosquitto import MosquittoError, find_mosquitto, start_mosquitto

REPO = Path(__file__).resolve().parents[1]


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


DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def export_tiny(out, tower: str = "text", backends=("ort-training",), **overrides):
    """Export a clip-tiny bundle (random-init, seed 0) into `out` and return the loaded Bundle."""
    from edge.bundle import load_bundle
    from export.pipeline import ExportOptions, export_bundle

    opts = ExportOptions(preset="clip-tiny", classes=list(DIGITS), out=out, tower=tower,
                         backends=tuple(backends), **overrides)
    export_bundle(opts, say=lambda _msg: None)
    return load_bundle(out)


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
