"""Devices that are away: the agent subscribes `global` and `round` at QoS 0 and relies on their retained copies,
so a device back after many rounds downloads the current global once instead of every one it missed."""

from __future__ import annotations

import threading
import time

import pytest

from bench import away
from flora.edge.protocol import DOWNLINK_QOS, Topics
from flora.edge.synthetic import synthetic_manifest
from flora.edge.training import Stopped

from .fakes import offline_agent


def test_the_agent_subscribes_its_downlink_at_qos_0(tmp_path):
    agent = offline_agent(tmp_path / "state")
    agent._on_connected(agent.client)
    topics = Topics("fed")
    assert agent.client.subscriptions == [[(topics.global_, 0), (topics.round, 0)]] and DOWNLINK_QOS == 0


@pytest.mark.mqtt
def test_a_device_away_for_eight_rounds_gets_only_the_current_global(mosquitto_binary, tmp_path):
    manifest = synthetic_manifest(blocks=4, width=64)
    before = away.measure(1, 8, manifest, tmp_path)  # the old QoS 1 subscriptions: the broker queued them all
    after = away.measure(DOWNLINK_QOS, 8, manifest, tmp_path)
    assert before["messages"] == {"global": 9, "round": 9}  # 8 queued while away + the retained copies
    assert after["messages"] == {"global": 1, "round": 1} and after["global_rounds_received"] == [8]
    assert after["bytes_total"] * 8 < before["bytes_total"]


def test_slowdown_makes_a_straggler_and_stop_still_ends_it(tmp_path):
    agent = offline_agent(tmp_path / "state", slowdown=3.0)
    t0 = time.monotonic()
    agent._straggle(0.2)  # (3 - 1) x 0.2 s
    assert time.monotonic() - t0 >= 0.39
    threading.Timer(0.1, agent.stop).start()
    t0 = time.monotonic()
    with pytest.raises(Stopped):
        agent._straggle(60.0)
    assert time.monotonic() - t0 < 5
