"""Baselines beside the federated run, on exactly the images the agents train on.

Each agent holds out `--val-fraction` of its shard (`edge.dataset.train_val_split`, seeded with
its client's split seed) and trains on the rest; `training_splits` repeats that split. Centralised
LoRA trains one adapter on the union of those training splits; local-only trains one adapter per
client on its own split. All run `rounds` blocks from the bundle's initial adapter, follow the
same per-round learning rate and optimizer resets as the agents (`Schedule`), and are tested
after each block on the shared held-out test split.

A block is either `epochs` epochs (what each agent runs in a round: "equal epochs") or a fixed
number of optimizer steps. Centralised training with equal epochs takes about K times the steps
of a round of K clients, so the sim also trains centralised LoRA for S steps a round, with
S = round(sum_k n_k s_k / sum_k n_k) (`equal_steps`): the sequential steps of the federated model,
whose update is the n_k-weighted mean of client updates of s_k steps each ("equal steps").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from flora.broker.schedule import round_lr
from flora.edge.bundle import Bundle
from flora.edge.dataset import Sample, train_val_split
from flora.edge.trainers import Trainer, TrainerError, open_trainer
from flora.edge.training import LocalData, batch_indices, evaluate, train_round

log = logging.getLogger("flora.sim")


def client_seed(seed: int, client: int) -> int:
    """The seed agent `client` runs with (its `--seed` for the batch order, its `--split-seed` for the splits)."""
    return seed + client


def training_splits(shards: Sequence[Sequence[Sample]], val_fraction: float, seed: int) -> List[List[Sample]]:
    """What each agent trains on: its shard less the validation images it holds out (same function, same seed)."""
    return [train_val_split(list(s), val_fraction, client_seed(seed, i))[0] for i, s in enumerate(shards)]


def steps_per_round(n: int, epochs: int, batch_size: int) -> int:
    """Optimizer steps of `epochs` epochs over n samples (the last batch of an epoch may be smaller)."""
    return epochs * -(-n // batch_size)


def equal_steps(sizes: Sequence[int], epochs: int, batch_size: int) -> int:
    """S = round(sum_k n_k s_k / sum_k n_k): the sequential steps of one FedAvg round (at least 1)."""
    total = sum(sizes)
    if total <= 0:
        raise ValueError("no training samples")
    weighted = sum(n * steps_per_round(n, epochs, batch_size) for n in sizes)
    return max(1, round(weighted / total))


@dataclass(frozen=True)
class Schedule:
    """What every arm runs per round: the agents' round config, as the aggregator sends it."""

    rounds: int  # rounds to run
    epochs: int
    lr: float
    batch_size: int
    lr_schedule: str = "constant"
    reset_optimizer: bool = False
    backend: str = "auto"
    threads: int = 1  # one intra-op thread, like the agents: several times faster for adapters this small
    total_rounds: Optional[int] = None  # what the lr schedule spans (the federation's --rounds; default: rounds)

    def lr_at(self, round_: int) -> float:
        return round_lr(self.lr, self.lr_schedule, round_, self.total_rounds or self.rounds)


def union(parts: Sequence[LocalData]) -> LocalData:
    """The concatenation of several LocalData of one kind (all features or all image paths)."""
    labels = np.concatenate([p.labels for p in parts])
    if all(p.features is not None for p in parts):
        return LocalData(labels, features=np.concatenate([p.features for p in parts]))
    paths = [path for p in parts for path in (p.paths or [])]
    return LocalData(labels, paths=paths, preprocess=parts[0].preprocess)


class BatchStream:
    """Shuffled epochs over n samples as one endless stream of batches (a new permutation each epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.rng = np.random.default_rng(seed)
        self._it: Iterator[np.ndarray] = iter(())

    def next(self) -> np.ndarray:
        for idx in self._it:
            return idx
        self._it = batch_indices(self.n, self.batch_size, self.rng)
        return next(self._it)


def train_steps(trainer: Trainer, data: LocalData, stream: BatchStream, steps: int) -> None:
    """`steps` optimizer steps on batches from `stream`."""
    for k in range(steps):
        idx = stream.next()
        result = trainer.train_step(data.inputs(idx), data.labels[idx])
        if not np.isfinite(result.loss):
            raise TrainerError(f"step {k + 1} produced a non-finite loss ({result.loss})")


def reset_moments(trainer: Trainer, bundle: Bundle, schedule: Schedule) -> Trainer:
    """The trainer with zeroed Adam moments and its weights kept (ort-training: reopened)."""
    reset = getattr(trainer, "reset_optimizer", None)
    if callable(reset):
        reset()
        return trainer
    weights = trainer.get_adapter()
    name = trainer.name
    del trainer
    fresh = open_trainer(bundle, name, threads=schedule.threads)
    fresh.set_adapter(weights)
    return fresh


def train_curve(bundle: Bundle, train: LocalData, test: LocalData, schedule: Schedule, seed: int,
                steps: Optional[int] = None) -> List[float]:
    """Test accuracy after each round from the bundle's initial adapter: `schedule.epochs` epochs a round
    (batch order seeded as an agent's, `seed * 100003 + round`), or `steps` steps a round if given."""
    trainer = open_trainer(bundle, schedule.backend, threads=schedule.threads)
    stream = BatchStream(len(train), schedule.batch_size, seed * 100003 + 7) if steps is not None else None
    curve = []
    for r in range(schedule.rounds):
        if schedule.reset_optimizer:
            trainer = reset_moments(trainer, bundle, schedule)
        trainer.set_lr(schedule.lr_at(r))
        if stream is not None:
            train_steps(trainer, train, stream, int(steps or 0))
        else:
            train_round(trainer, train, epochs=schedule.epochs, batch_size=schedule.batch_size,
                        seed=seed * 100003 + r)
        result = evaluate(trainer, test)
        assert result is not None
        curve.append(result.accuracy)
    return curve


def centralised(bundle: Bundle, splits: Sequence[LocalData], test: LocalData, schedule: Schedule, seed: int,
                steps: Optional[int] = None) -> List[float]:
    """One adapter trained on the union of the clients' training splits (equal epochs, or `steps` a round)."""
    data = union(splits)
    log.info("baseline: centralised LoRA on %d images (%s a round)", len(data),
             f"{steps} steps" if steps is not None else f"{schedule.epochs} epochs")
    return train_curve(bundle, data, test, schedule, seed, steps)


def local_only(bundle: Bundle, splits: Sequence[LocalData], test: LocalData, schedule: Schedule,
               seed: int) -> Dict[str, List[float]]:
    """Per-round test accuracy of each client's adapter trained on its own split alone, by client id."""
    curves = {}
    for i, data in enumerate(splits):
        log.info("baseline: local-only LoRA on client %d's %d images", i, len(data))
        curves[f"client-{i}"] = train_curve(bundle, data, test, schedule, client_seed(seed, i))
    return curves


def mean_curve(curves: Dict[str, List[float]]) -> List[float]:
    """The unweighted mean over clients, round by round."""
    return [float(v) for v in np.mean(np.array(list(curves.values()), dtype=np.float64), axis=0)]
