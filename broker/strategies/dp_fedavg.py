"""DP-FedAvg (McMahan et al. 2018, "Learning differentially private recurrent language models").

Every update's delta from the round's global is clipped to L2 norm `clip` (the agents clip already;
the server does it again, so one device that does not cannot exceed the bound), the clipped deltas
are summed with equal weights, Gaussian noise of standard deviation `noise_multiplier * clip` is
added to the sum, and the sum is divided by the number of clients the round asked (a number fixed
before any update is seen, so the divisor leaks nothing; clients that drop out shrink the step):

    global' = global + (sum_k clip(delta_k) + N(0, (z C)^2 I)) / asked

Adding or removing one device changes the sum by at most C, so each round is a Gaussian mechanism of
noise multiplier z; broker/accountant.py turns the rounds into epsilon. num_samples gives no extra
weight (it would multiply one device's influence); it is still checked.

`mode=distributed`: the clients add the noise themselves (each a share of std z*C/sqrt(n), n the
clients the round asked, see edge/dp.py) and secure aggregation hides the single noisy updates: its
unmasked sum arrives as one partial (`accumulate_partial`: every client encoded with weight 1, so the
partial's weight is the number m of shares in it). The server adds no noise and does not clip (that
would shrink the clients' noise); it divides by m (the survivors of a secure round are known to it
anyway, and the step stays unbiased under dropout):

    global' = global + (sum_{k in survivors} (clip(delta_k) + share_k)) / m

If m < n shares arrive, less noise is in the sum, std z*C*sqrt(m/n): the round's effective noise
multiplier is z*sqrt(m/n) (`round_info`), and that is what the accountant charges (the dropout caveat).

The noise is drawn in float64 from `edge.dp.noise_rng` (PCG64 seeded with 256 bits of os.urandom).
"""

from __future__ import annotations

import math
from typing import ClassVar, Dict, Mapping, Optional, Sequence

import numpy as np

from flora.edge.adapter import FlatTensors, Layout, layout_of
from flora.edge.bundle import TensorSpec
from flora.edge.dp import check_clip, clip_factor, noise_rng

from .base import Strategy
from .deltas import check_weight, delta_of, flat_global, l2
from .options import Option, choice, positive_float

CENTRAL = "central"
DISTRIBUTED = "distributed"
MODES = (CENTRAL, DISTRIBUTED)


def _non_negative_float(value) -> float:
    x = float(value)
    if not (x >= 0 and math.isfinite(x)):
        raise ValueError("must be a finite number >= 0")
    return x


def _seed(value) -> Optional[int]:
    return None if value in (None, "", "none") else int(value)


class DPFedAvg(Strategy):
    name = "dp-fedavg"
    options: ClassVar[Dict[str, Option]] = {
        "clip": Option(positive_float, None, "L2 bound C on each update's delta (required)"),
        "noise_multiplier": Option(_non_negative_float, 1.0, "z: noise std z*C on the sum"),
        "mode": Option(choice(*MODES), CENTRAL, "central: the server adds the noise; distributed: the clients do"),
        "noise_seed": Option(_seed, None, "fixed noise seed (tests only: predictable noise protects nothing)"),
    }

    def __init__(self, clip: Optional[float] = None, noise_multiplier: float = 1.0, mode: str = CENTRAL,
                 noise_seed: Optional[int] = None) -> None:
        if clip is None:
            raise ValueError("DP-FedAvg needs a clip norm (--dp-clip C): the L2 bound on each update's delta")
        self.clip = check_clip(float(clip))
        self.noise_multiplier = _non_negative_float(noise_multiplier)
        if mode not in MODES:
            raise ValueError(f"DP mode must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        self.needs_individual_updates = mode == CENTRAL  # central clips each update; distributed only sums
        self.folds_partials = mode == DISTRIBUTED  # secure aggregation's sum of clipped, noised deltas
        self._rng = noise_rng(noise_seed)
        self._layout: Optional[Layout] = None
        self._global = np.zeros(0)
        self._sum = np.zeros(0)
        self._count = 0
        self._samples = 0
        self._clipped = 0
        self._asked: Optional[int] = None
        self._info: Dict[str, object] = {}

    def begin_round(self, specs: Sequence[TensorSpec], current_global: Mapping[str, np.ndarray]) -> None:
        self._layout = layout_of(tuple(specs))
        self._global = flat_global(current_global, self._layout)
        self._sum = np.zeros(self._layout.numel, np.float64)
        self._count, self._samples, self._clipped = 0, 0, 0
        self._asked = None
        self._info = {}

    def set_round_size(self, asked: int) -> None:
        if asked < 1:
            raise ValueError(f"a DP round must ask at least one client, got {asked}")
        self._asked = int(asked)

    def accumulate(self, tensors: Mapping[str, np.ndarray], num_samples: int) -> None:
        samples = check_weight(num_samples)
        if self._layout is None:
            raise RuntimeError("accumulate() before begin_round()")
        delta = delta_of(tensors, self._global, self._layout)
        if self.mode == CENTRAL:
            norm = l2(delta)
            if not math.isfinite(norm):
                peak = float(np.max(np.abs(delta)))
                norm = peak * l2(delta / peak)
            scale = clip_factor(norm, self.clip)
            self._clipped += int(scale < 1.0)
            if scale < 1.0:
                delta *= scale
        self._sum += delta
        self._count += 1
        self._samples += samples

    def accumulate_partial(self, weighted_sum: Mapping[str, np.ndarray], total_weight: int) -> None:
        """Distributed mode: fold secure aggregation's sum, m * global + sum of m clipped, noised deltas, with
        `total_weight` = m (each client encodes weight 1: DP-FedAvg is unweighted). No clip, no noise here."""
        if self.mode != DISTRIBUTED:
            raise ValueError("central DP-FedAvg clips each update itself: it cannot fold a sum of updates")
        if self._layout is None:
            raise RuntimeError("accumulate_partial() before begin_round()")
        m = check_weight(total_weight)
        if isinstance(weighted_sum, FlatTensors) and weighted_sum.layout is self._layout:
            flat = np.asarray(weighted_sum.flat, np.float64)
        else:
            flat = flat_global(weighted_sum, self._layout)
        self._sum += flat - m * self._global
        self._count += m
        self._samples += m

    def finalize(self) -> Optional[Dict[str, np.ndarray]]:
        if self._count == 0:
            return None
        assert self._layout is not None
        asked = max(self._asked or self._count, self._count)
        divisor = self._count if self.mode == DISTRIBUTED else asked
        total = self._sum
        if self.mode == CENTRAL and self.noise_multiplier > 0:
            total = total + self._rng.normal(0.0, self.noise_multiplier * self.clip, total.shape)
        effective = self.noise_multiplier * (math.sqrt(self._count / asked) if self.mode == DISTRIBUTED else 1.0)
        self._info = {"dp": {"mode": self.mode, "clip": self.clip, "noise_multiplier": self.noise_multiplier,
                             "effective_noise_multiplier": effective, "divisor": divisor, "asked": asked,
                             "shares": self._count if self.mode == DISTRIBUTED else 0,
                             "noise_std_of_mean": effective * self.clip / divisor, "clipped": self._clipped}}
        with np.errstate(over="ignore", invalid="ignore"):
            return self._layout.split((self._global + total / divisor).astype(np.float32))

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_samples(self) -> int:
        return self._samples

    @property
    def effective_noise_multiplier(self) -> float:
        """The noise multiplier of the round just finalized (less than z if distributed shares are missing)."""
        info = self._info.get("dp")
        return float(info["effective_noise_multiplier"]) if isinstance(info, dict) else self.noise_multiplier

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, "clip": self.clip, "noise_multiplier": self.noise_multiplier, "mode": self.mode}

    def round_info(self) -> Dict[str, object]:
        return dict(self._info)
