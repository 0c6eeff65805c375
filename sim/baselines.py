"""Baselines beside the federated run, on exactly the images the agents train on.

Each agent holds out `--val-fraction` of its shard (`edge.dataset.train_val_split`, seeded with
its client seed) and trains on the rest; `training_splits` repeats that split. Centralised LoRA
trains one adapter on the union of those training splits; local-only trains one adapter per
client on its own split. Both run `rounds` blocks of `epochs` epochs from the bundle's initial
adapter and are tested after each block on the shared held-out test split.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Sequence

import numpy as np

from flora.edge.bundle import Bundle
from flora.edge.dataset import Sample, train_val_split
from flora.edge.trainers import open_trainer
from flora.edge.training import LocalData, evaluate, train_round

log = logging.getLogger("flora.sim")


def client_seed(seed: int, client: int) -> int:
    """The `--seed` agent `client` runs with: its validation split and its batch order."""
    return seed + client


def training_splits(shards: Sequence[Sequence[Sample]], val_fraction: float, seed: int) -> List[List[Sample]]:
    """What each agent trains on: its shard less the validation images it holds out (same function, same seed)."""
    return [train_val_split(list(s), val_fraction, client_seed(seed, i))[0] for i, s in enumerate(shards)]


def union(parts: Sequence[LocalData]) -> LocalData:
    """The concatenation of several LocalData of one kind (all features or all image paths)."""
    labels = np.concatenate([p.labels for p in parts])
    if all(p.features is not None for p in parts):
        return LocalData(labels, features=np.concatenate([p.features for p in parts]))
    paths = [path for p in parts for path in (p.paths or [])]
    return LocalData(labels, paths=paths, preprocess=parts[0].preprocess)


def train_curve(bundle: Bundle, train: LocalData, test: LocalData, *, rounds: int, epochs: int, lr: float,
                batch_size: int, seed: int, backend: str = "auto", threads: int = 1) -> List[float]:
    """Test accuracy after each of `rounds` blocks of `epochs` epochs, from the bundle's initial adapter.

    One intra-op thread, like the agents: for adapters this small it is several times faster than many.
    """
    trainer = open_trainer(bundle, backend, threads=threads)
    trainer.set_lr(lr)
    curve = []
    for r in range(rounds):
        train_round(trainer, train, epochs=epochs, batch_size=batch_size, seed=seed * 100003 + r)
        result = evaluate(trainer, test)
        assert result is not None
        curve.append(result.accuracy)
    return curve


def centralised(bundle: Bundle, splits: Sequence[LocalData], test: LocalData, **kw) -> List[float]:
    """One adapter trained on the union of the clients' training splits."""
    data = union(splits)
    log.info("baseline: centralised LoRA on %d images", len(data))
    return train_curve(bundle, data, test, **kw)


def local_only(bundle: Bundle, splits: Sequence[LocalData], test: LocalData, *, seed: int,
               **kw) -> Dict[str, List[float]]:
    """Per-round test accuracy of each client's adapter trained on its own split alone, by client id."""
    curves = {}
    for i, data in enumerate(splits):
        log.info("baseline: local-only LoRA on client %d's %d images", i, len(data))
        curves[f"client-{i}"] = train_curve(bundle, data, test, seed=client_seed(seed, i), **kw)
    return curves


def mean_curve(curves: Dict[str, List[float]]) -> List[float]:
    """The unweighted mean over clients, round by round."""
    return [float(v) for v in np.mean(np.array(list(curves.values()), dtype=np.float64), axis=0)]
