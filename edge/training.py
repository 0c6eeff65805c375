"""A client's local round: epochs of AdamW steps over its data, then evaluation on its validation split."""

from __future__ import annotations

import logging
import resource
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .fileio import PathLike
from .preprocess import preprocess_batch
from .trainers.base import StepResult, Trainer, TrainerError

log = logging.getLogger(__name__)


class Stopped(Exception):
    """Training was asked to stop before the round finished."""


class LocalData:
    """Labelled inputs for a trainer: cached features (text mode) or images decoded per batch."""

    def __init__(self, labels: np.ndarray, features: Optional[np.ndarray] = None,
                 paths: Optional[Sequence[PathLike]] = None, preprocess=None) -> None:
        if (features is None) == (paths is None):
            raise ValueError("give either features or image paths")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.features = features
        self.paths = list(paths) if paths is not None else None
        self.preprocess = preprocess
        n = len(features) if features is not None else len(self.paths or [])
        if n != len(self.labels):
            raise ValueError(f"{n} inputs but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, idx: np.ndarray) -> np.ndarray:
        if self.features is not None:
            return self.features[idx]
        return preprocess_batch([self.paths[i] for i in idx], self.preprocess)

    def subset(self, idx: Sequence[int]) -> LocalData:
        idx = np.asarray(idx, dtype=np.int64)
        if self.features is not None:
            return LocalData(self.labels[idx], features=self.features[idx])
        return LocalData(self.labels[idx], paths=[self.paths[i] for i in idx], preprocess=self.preprocess)


def batch_indices(n: int, batch_size: int, rng: Optional[np.random.Generator] = None) -> Iterator[np.ndarray]:
    """Index batches over n items, shuffled when `rng` is given; the last batch may be smaller."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / (1024.0 * 1024.0)


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    samples: int


#: validation batch for cached features (cheap: the class prompts go through the text tower once a batch)
FEATURE_EVAL_BATCH = 256


def eval_batch_size(input_kind: str, train_batch: int) -> int:
    """Validate features in large batches, pixels at the training batch (a pixel batch's memory grows
    with its size, and the step backend evaluates through its training graph)."""
    return FEATURE_EVAL_BATCH if input_kind == "features" else train_batch


def evaluate(model, data: LocalData, batch_size: int = FEATURE_EVAL_BATCH) -> Optional[Evaluation]:
    """Mean cross-entropy and accuracy of `model`'s current adapter (a Trainer, or anything with
    `evaluate_batch(inputs, labels)`); None for no data."""
    if len(data) == 0:
        return None
    total_loss, correct = 0.0, 0
    for idx in batch_indices(len(data), batch_size):
        result = model.evaluate_batch(data.inputs(idx), data.labels[idx])
        total_loss += result.loss * result.count
        correct += result.correct
    return Evaluation(total_loss / len(data), correct / len(data), len(data))


@dataclass(frozen=True)
class RoundResult:
    loss: float  # mean training loss over the round's steps
    train_accuracy: float
    steps: int
    epochs: int
    samples: int
    wall_time_s: float
    step_time_s: float  # mean time of one training step
    images_per_s: float
    peak_rss_mb: float


def train_round(
    trainer: Trainer,
    data: LocalData,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    progress: Optional[Callable[[str], None]] = None,
    progress_every_s: float = 5.0,
    should_stop: Optional[Callable[[], bool]] = None,
    on_step: Optional[Callable[[np.ndarray, StepResult], None]] = None,
) -> RoundResult:
    """Run `epochs` shuffled passes of AdamW steps over `data` (the trainer holds lr and weights);
    `on_step(batch indices, result)` after each step.

    Raises TrainerError on a non-finite loss, ImageError for an image that cannot be decoded.
    """
    if len(data) == 0:
        raise ValueError("no training samples")
    rng = np.random.default_rng(seed)
    steps_per_epoch = -(-len(data) // batch_size)
    t_start = time.perf_counter()
    last_report = t_start
    loss_sum, correct, seen, step_time, steps = 0.0, 0, 0, 0.0, 0
    for epoch in range(epochs):
        for k, idx in enumerate(batch_indices(len(data), batch_size, rng)):
            if should_stop is not None and should_stop():
                raise Stopped(f"stopped at epoch {epoch + 1} step {k + 1}")
            x = data.inputs(idx)
            t0 = time.perf_counter()
            result = trainer.train_step(x, data.labels[idx])
            step_time += time.perf_counter() - t0
            if not np.isfinite(result.loss):  # the step backend checks this itself; ort-training does not
                raise TrainerError(f"epoch {epoch + 1} step {k + 1} produced a non-finite loss ({result.loss})")
            if on_step is not None:
                on_step(idx, result)
            steps += 1
            loss_sum += result.loss * result.count
            correct += result.correct
            seen += result.count
            now = time.perf_counter()
            last_step = epoch == epochs - 1 and k == steps_per_epoch - 1
            if progress and (now - last_report >= progress_every_s or last_step):
                last_report = now
                progress(
                    f"epoch {epoch + 1}/{epochs} step {k + 1}/{steps_per_epoch} loss {loss_sum / seen:.4f} "
                    f"acc {correct / seen:.3f} {seen / (now - t_start):.1f} img/s"
                )
    wall = time.perf_counter() - t_start
    return RoundResult(
        loss=loss_sum / seen,
        train_accuracy=correct / seen,
        steps=steps,
        epochs=epochs,
        samples=len(data),
        wall_time_s=wall,
        step_time_s=step_time / steps,
        images_per_s=seen / wall if wall > 0 else float("inf"),
        peak_rss_mb=peak_rss_mb(),
    )
