"""Shared fixtures: a private mosquitto broker per test that asks for one."""

from __future__ import annotations

import os

import pytest

from broker.mosquitto import MosquittoError, find_mosquitto, start_mosquitto


@pytest.fixture
def mosquitto(tmp_path):
    """A real mosquitto on a free loopback port, anonymous access, stopped after the test."""
    try:
        find_mosquitto()
    except MosquittoError as exc:
        if os.environ.get("FLORA_REQUIRE_MOSQUITTO"):  # set by .ci/run: CI must not skip these
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    broker = start_mosquitto(tmp_path / "mosquitto")
    yield broker
    broker.stop()
