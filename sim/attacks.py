"""Poisoned devices for `flora-sim --malicious K --attack KIND`: what an attacker does to its update or data.

Model poisoning rewrites the update an attacker trained honestly, through its delta d from the
round's global g (the update sent is g + d'):
- `sign-flip[:X]`: d' = -X d (default X = 1), pulling the model back along the honest direction;
- `scale:X`: d' = X d, boosting one device's step X-fold (model replacement);
- `noise[:S]`: d' = S * rms(d) * N(0, I) (default S = 10), a random update S times the size of an
  honest one per coordinate.
Data poisoning: `label-flip` trains on labels y -> C - 1 - y (C classes) and sends that update as it
is. Attackers are chosen by `choose_attackers` (seeded, so a run is reproducible). This module is the
simulator's own; the device code never imports it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import numpy as np

from flora.edge.errors import ConfigError

KINDS = ("sign-flip", "scale", "noise", "label-flip")
_DEFAULTS = {"sign-flip": 1.0, "noise": 10.0}


class AttackError(ConfigError):
    """An --attack or --malicious value that cannot be used."""


@dataclass(frozen=True)
class Attack:
    kind: str
    factor: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Attack:
        """`sign-flip`, `sign-flip:X`, `scale:X`, `noise`, `noise:S` or `label-flip`."""
        kind, sep, arg = str(text).strip().partition(":")
        if kind not in KINDS:
            raise AttackError(f"unknown attack {text!r}; use one of sign-flip[:X], scale:X, noise[:S], label-flip")
        if kind == "label-flip":
            if sep:
                raise AttackError("label-flip takes no argument")
            return cls(kind, 1.0)
        if not sep:
            if kind == "scale":
                raise AttackError("scale needs its factor: scale:X (e.g. scale:100)")
            return cls(kind, _DEFAULTS[kind])
        try:
            factor = float(arg)
        except ValueError:
            raise AttackError(f"attack {text!r}: {arg!r} is not a number") from None
        if not (math.isfinite(factor) and factor > 0):
            raise AttackError(f"attack {text!r}: the factor must be a finite number > 0")
        return cls(kind, factor)

    @property
    def describe(self) -> str:
        return self.kind if self.kind == "label-flip" else f"{self.kind}:{self.factor:g}"

    @property
    def poisons_model(self) -> bool:
        return self.kind != "label-flip"

    def poison_update(self, local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray],
                      rng: Optional[np.random.Generator] = None) -> Dict[str, np.ndarray]:
        """The update an attacker sends instead of `local` (float32); `local` itself for label-flip."""
        if not self.poisons_model:
            return {k: np.asarray(v, np.float32) for k, v in local.items()}
        deltas = {k: np.asarray(local[k], np.float64) - np.asarray(global_[k], np.float64) for k in local}
        if self.kind == "sign-flip":
            poisoned = {k: -self.factor * d for k, d in deltas.items()}
        elif self.kind == "scale":
            poisoned = {k: self.factor * d for k, d in deltas.items()}
        else:
            count = sum(d.size for d in deltas.values())
            rms = math.sqrt(sum(float(np.sum(d * d)) for d in deltas.values()) / max(count, 1))
            rng = rng if rng is not None else np.random.default_rng()
            poisoned = {k: rng.normal(0.0, self.factor * rms, d.shape) for k, d in deltas.items()}
        return {k: (np.asarray(global_[k], np.float64) + d).astype(np.float32) for k, d in poisoned.items()}

    def poison_labels(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """The labels an attacker trains on: y -> C - 1 - y for label-flip, unchanged otherwise."""
        labels = np.asarray(labels)
        if self.kind != "label-flip":
            return labels
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise AttackError(f"labels must lie in [0, {num_classes})")
        return (num_classes - 1 - labels).astype(labels.dtype)


def choose_attackers(clients: int, malicious: int, seed: int) -> List[int]:
    """Which of the clients 0..clients-1 are malicious: `malicious` of them, drawn with `seed`."""
    if not 0 <= malicious <= clients:
        raise AttackError(f"--malicious must lie in [0, {clients}] (the number of clients), got {malicious}")
    return sorted(random.Random(f"attackers:{seed}").sample(range(clients), malicious))
