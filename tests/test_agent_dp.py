"""The device side of differential privacy and of the simulator's attacks: what an agent sends when a round (or
its own --dp-clip) asks it to clip, with a noise share, and what a poisoned device sends instead."""

from __future__ import annotations

import math

import numpy as np

from flora.edge import dp
from flora.edge.protocol import RoundAnnouncement, TrainConfig
from flora.edge.synthetic import random_adapter
from flora.sim.attacks import Attack
from flora.sim.poisoned_agent import poisoned

from .fakes import offer_round, offline_agent, updates


def _sent_delta(agent, global_):
    (update,) = updates(agent)
    return update.as_float32(), dp.delta_norm(update.as_float32(), global_)


def _dp_round(agent, **config):
    g = random_adapter(agent.manifest, 0)
    offer_round(agent, 0, tensors=g, config=TrainConfig(epochs=1, lr=5e-3, batch_size=4, **config))
    agent.pump()
    return g


def test_without_dp_the_trained_adapter_goes_as_it_is(tmp_path):
    agent = offline_agent(tmp_path / "s")
    g = _dp_round(agent)
    _, norm = _sent_delta(agent, g)
    assert norm > 0.5  # the fake trainer moved every element by 5 x 5e-3


def test_a_dp_round_makes_the_device_clip_its_delta_to_the_rounds_norm(tmp_path):
    agent = offline_agent(tmp_path / "s")
    honest = offline_agent(tmp_path / "h")
    g = _dp_round(agent, clip_norm=0.1)
    _dp_round(honest)
    sent, norm = _sent_delta(agent, g)
    plain, plain_norm = _sent_delta(honest, g)
    assert math.isclose(norm, 0.1, rel_tol=1e-5)
    for k in g:  # the same direction, scaled down
        np.testing.assert_allclose(sent[k] - g[k], (plain[k] - g[k]) * 0.1 / plain_norm, atol=1e-6)


def test_the_devices_own_clip_holds_whatever_the_round_asks(tmp_path):
    strict = offline_agent(tmp_path / "a", dp_clip=0.05)
    g = _dp_round(strict, clip_norm=0.1)
    assert math.isclose(_sent_delta(strict, g)[1], 0.05, rel_tol=1e-5)
    alone = offline_agent(tmp_path / "b", dp_clip=0.05)
    g = _dp_round(alone)  # a round without DP: the device clips anyway
    assert math.isclose(_sent_delta(alone, g)[1], 0.05, rel_tol=1e-5)


def test_a_distributed_round_adds_the_devices_noise_share_to_the_clipped_delta(tmp_path):
    agent = offline_agent(tmp_path / "s")
    g = _dp_round(agent, clip_norm=0.1, noise_std=0.02)
    sent, _ = _sent_delta(agent, g)
    clipped_only = offline_agent(tmp_path / "c")
    _dp_round(clipped_only, clip_norm=0.1)
    plain, _ = _sent_delta(clipped_only, g)
    noise = np.concatenate([(sent[k] - plain[k]).ravel() for k in sent])
    assert abs(noise.std() / 0.02 - 1) < 0.1 and abs(noise.mean()) < 0.005


def test_a_noise_share_without_a_clip_norm_is_refused(tmp_path):
    agent = offline_agent(tmp_path / "s")
    _dp_round(agent, noise_std=0.02)
    assert updates(agent) == []
    assert agent.client.statuses()[-1].state == "error"


def test_a_round_without_dp_says_nothing_of_it_on_the_wire():
    plain = RoundAnnouncement(0, "m" * 64, "training", TrainConfig(), "all", 1.0, "a" * 64, 3).to_json()
    assert b"clip_norm" not in plain and b"noise_std" not in plain
    private = RoundAnnouncement(0, "m" * 64, "training", TrainConfig(clip_norm=0.5), "all", 1.0, "a" * 64, 3)
    assert RoundAnnouncement.from_json(private.to_json()).config.clip_norm == 0.5


def test_a_poisoned_device_sends_its_attack_and_does_not_clip(tmp_path):
    evil = offline_agent(tmp_path / "e", agent_class=poisoned(Attack.parse("scale:10"), 0))
    honest = offline_agent(tmp_path / "h")
    g = _dp_round(evil, clip_norm=0.1)
    _dp_round(honest)
    _, norm = _sent_delta(evil, g)
    _, honest_norm = _sent_delta(honest, g)
    assert math.isclose(norm, 10 * honest_norm, rel_tol=1e-4)  # ten times the honest step, the clip ignored
