"""The simulator's attacks: what each does to an update's delta or to the labels, and who attacks."""

from __future__ import annotations

import numpy as np
import pytest

from flora.edge.dp import delta_norm
from flora.edge.synthetic import random_adapter, synthetic_manifest
from flora.sim.attacks import Attack, AttackError, choose_attackers

M = synthetic_manifest(blocks=2, width=16, rank=4)


def _delta(u, g):
    return np.concatenate([np.ravel(u[k]).astype(np.float64) - np.ravel(g[k]) for k in sorted(g)])


def test_parsing_and_defaults():
    assert Attack.parse("sign-flip") == Attack("sign-flip", 1.0)
    assert Attack.parse("scale:100") == Attack("scale", 100.0) and Attack.parse("scale:100").describe == "scale:100"
    assert Attack.parse("noise") == Attack("noise", 10.0) and Attack.parse("noise:2.5").factor == 2.5
    assert Attack.parse("label-flip").poisons_model is False
    for bad in ("scale", "scale:x", "scale:-1", "scale:inf", "krum", "label-flip:2", "noise:0"):
        with pytest.raises(AttackError):
            Attack.parse(bad)


def test_model_poisoning_rewrites_the_delta():
    g, u = random_adapter(M, 0), random_adapter(M, 1)
    d = _delta(u, g)
    np.testing.assert_allclose(_delta(Attack.parse("sign-flip").poison_update(u, g), g), -d, atol=1e-6)
    np.testing.assert_allclose(_delta(Attack.parse("sign-flip:3").poison_update(u, g), g), -3 * d, atol=1e-5)
    np.testing.assert_allclose(_delta(Attack.parse("scale:100").poison_update(u, g), g), 100 * d, rtol=1e-5,
                               atol=1e-4)
    noisy = _delta(Attack.parse("noise:10").poison_update(u, g, np.random.default_rng(123)), g)
    rms = np.sqrt(np.mean(d ** 2))
    assert abs(noisy.std() / (10 * rms) - 1) < 0.05 and abs(np.corrcoef(noisy, d)[0, 1]) < 0.1
    assert delta_norm(Attack.parse("label-flip").poison_update(u, g), u) == 0.0  # sent as trained


def test_label_flip_reverses_the_labels():
    a = Attack.parse("label-flip")
    np.testing.assert_array_equal(a.poison_labels(np.array([0, 3, 9]), 10), [9, 6, 0])
    np.testing.assert_array_equal(Attack.parse("scale:5").poison_labels(np.array([1, 2]), 10), [1, 2])
    with pytest.raises(AttackError):
        a.poison_labels(np.array([10]), 10)


def test_attackers_are_seeded_and_bounded():
    assert choose_attackers(10, 1, 0) == choose_attackers(10, 1, 0)
    assert len(set(choose_attackers(10, 3, 1))) == 3 and choose_attackers(10, 0, 0) == []
    assert {tuple(choose_attackers(10, 1, s)) for s in range(20)} != {(0,)}
    with pytest.raises(AttackError):
        choose_attackers(4, 5, 0)
