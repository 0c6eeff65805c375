"""Baselines beside the federated run: centralised LoRA on the union of the shards, and local-only
training on each shard alone, both for the same number of epochs each federated client ran."""

from __future__ import annotations

import logging
from typing import Dict, List, Sequence

import numpy as np

from edge.bundle import Bundle
from edge.trainers import open_trainer
from edge.training import LocalData, evaluate, train_round

log = logging.getLogger("flora.sim")


def train_curve(bundle: Bundle, train: LocalData, test: LocalData, *, rounds: int, epochs: int, lr: float,
                batch_size: int, seed: int, backend: str = "auto") -> List[float]:
    """Test accuracy after each of `rounds` blocks of `epochs` epochs, from the bundle's initial adapter."""
    trainer = open_trainer(bundle, backend)
    trainer.set_lr(lr)
    curve = []
    for r in range(rounds):
        train_round(trainer, train, epochs=epochs, batch_size=batch_size, seed=seed * 100003 + r)
        result = evaluate(trainer, test)
        assert result is not None
        curve.append(result.accuracy)
    return curve


def centralised(bundle: Bundle, shards: Sequence[LocalData], test: LocalData, **kw) -> List[float]:
    union = LocalData(np.concatenate([s.labels for s in shards]),
                      features=np.concatenate([s.features for s in shards]))
    log.info("baseline: centralised LoRA on %d images", len(union))
    return train_curve(bundle, union, test, **kw)


def local_only(bundle: Bundle, shards: Sequence[LocalData], test: LocalData, **kw) -> Dict[str, List[float]]:
    """Per-round test accuracy of each client trained on its own shard, and their mean."""
    curves = {}
    for i, shard in enumerate(shards):
        log.info("baseline: local-only LoRA on client %d's %d images", i, len(shard))
        curves[f"client-{i}"] = train_curve(bundle, shard, test, **kw)
    curves["mean"] = list(np.mean(np.array([curves[f"client-{i}"] for i in range(len(shards))]), axis=0))
    return curves
