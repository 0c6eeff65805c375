"""Virtual clients sharing one step session: interleaved training gives each client exactly what its own
trainer would have, weights, moments and step count included."""

from __future__ import annotations

import numpy as np

from flora.edge.trainers import open_trainer
from flora.edge.trainers.shared import SharedStepTrainer

from .helpers import batches


def test_interleaved_clients_train_exactly_as_separate_trainers(tiny_all_bundle):
    dim = tiny_all_bundle.manifest.feature_dim
    data = {c: batches(dim, steps=6, seed=c) for c in range(3)}
    lrs = {0: 5e-3, 1: 1e-3, 2: 2e-2}

    alone = {}
    for c in range(3):
        t = open_trainer(tiny_all_bundle, "step", threads=1)
        t.set_lr(lrs[c])
        losses = [t.train_step(x, y).loss for x, y in data[c]]
        alone[c] = (t.get_adapter(), t.optimizer_state(), t.steps, losses)

    shared = SharedStepTrainer(tiny_all_bundle, threads=1)
    clients = {c: shared.client() for c in range(3)}
    for c, t in clients.items():
        t.set_lr(lrs[c])
    losses = {c: [] for c in range(3)}
    for step in range(6):  # round-robin: every call switches client
        for c in (2, 0, 1):
            x, y = data[c][step]
            losses[c].append(clients[c].train_step(x, y).loss)
    assert shared.swaps >= 18
    for c in range(3):
        weights, moments, steps, expected_losses = alone[c]
        assert clients[c].steps == steps == 6
        assert losses[c] == expected_losses  # bit for bit
        got = clients[c].get_adapter()
        for name in weights:
            np.testing.assert_array_equal(got[name], weights[name])
        state = clients[c].optimizer_state()
        for name in moments:
            np.testing.assert_array_equal(state[name], moments[name])
    # a client's reset and new adapter touch that client alone
    clients[0].reset_optimizer()
    clients[0].set_adapter({k: np.zeros_like(v) for k, v in alone[0][0].items()})
    assert clients[1].steps == 6 and clients[0].steps == 0
    np.testing.assert_array_equal(clients[1].get_adapter()[next(iter(alone[1][0]))], next(iter(alone[1][0].values())))
    fresh = shared.client()
    first = open_trainer(tiny_all_bundle, "step", threads=1).get_adapter()
    for name, value in fresh.get_adapter().items():  # a new client starts from the bundle's initial adapter
        np.testing.assert_array_equal(value, first[name])
