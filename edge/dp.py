"""User-level differential privacy on the device side: clip the update's delta, add a noise share.

DP-FedAvg (McMahan et al. 2018) bounds what one device can contribute to a round: the change it
made to the round's global adapter (its *delta*, L2 over all LoRA tensors together) is scaled down to
at most `clip` before it leaves the device. The Gaussian noise that makes the released average
differentially private is added either by the aggregator to the sum (trusted server) or, split
across the clients, by each client to its own clipped delta (distributed DP, with secure aggregation
hiding the individual noisy updates): `n` shares of standard deviation z*C/sqrt(n) sum to one of z*C.

Pure numpy, no I/O: the agent and the aggregator call the same functions.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import numpy as np


@dataclass(frozen=True)
class Clipped:
    """The clipped update (global + scaled delta, float32), the delta's L2 norm before and the factor applied."""

    tensors: Dict[str, np.ndarray]
    norm: float
    scale: float

    @property
    def was_clipped(self) -> bool:
        return self.scale < 1.0


def delta_norm(local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (local - global) over all tensors together, in float64."""
    _check_names(local, global_)
    total = 0.0
    for name, value in local.items():
        d = np.asarray(value, np.float64) - np.asarray(global_[name], np.float64)
        total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def clip_factor(norm: float, clip: float) -> float:
    """min(1, clip / norm): the factor that brings a delta of L2 norm `norm` within `clip`."""
    check_clip(clip)
    if not math.isfinite(norm) or norm < 0:
        raise ValueError(f"the update's delta norm is {norm}, not a finite non-negative number")
    return 1.0 if norm <= clip else clip / norm


def clip_update(local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray], clip: float) -> Clipped:
    """global + min(1, clip/||delta||) * delta, with delta = local - global (L2 over all tensors)."""
    norm = delta_norm(local, global_)
    scale = clip_factor(norm, clip)
    out = {}
    for name, value in local.items():
        g = np.asarray(global_[name], np.float64)
        out[name] = (g + scale * (np.asarray(value, np.float64) - g)).astype(np.float32)
    return Clipped(out, norm, scale)


def effective_clip(round_clip: Optional[float], own_clip: Optional[float]) -> Optional[float]:
    """The bound a device clips to: the round's (`clip_norm`) or its own (`--dp-clip`), the smaller if both."""
    given = [c for c in (round_clip, own_clip) if c is not None]
    return check_clip(min(given)) if given else None


@dataclass(frozen=True)
class Privatized:
    """What a device sends under DP: global + its clipped delta (+ its noise share), and what was done."""

    tensors: Dict[str, np.ndarray]
    norm: float  # of the delta before clipping
    clip: float
    noise_std: Optional[float]

    @property
    def was_clipped(self) -> bool:
        return self.norm > self.clip


def privatize(local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray], clip: float,
              noise_std: Optional[float] = None, rng: Optional[np.random.Generator] = None) -> Privatized:
    """The update a DP device sends: its delta from the round's global clipped to `clip`, plus (distributed DP)
    Gaussian noise of std `noise_std` per element from `rng` (default: `noise_rng()`)."""
    clipped = clip_update(local, global_, clip)
    tensors = clipped.tensors
    if noise_std:
        tensors = add_noise(tensors, noise_std, rng if rng is not None else noise_rng())
    return Privatized(tensors, clipped.norm, clip, noise_std)


def noise_share_std(noise_multiplier: float, clip: float, clients: int) -> float:
    """Standard deviation of one client's noise share: `clients` shares sum to N(0, (z*C)^2)."""
    check_clip(clip)
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"the noise multiplier must be a finite number >= 0, got {noise_multiplier}")
    if clients < 1:
        raise ValueError(f"a noise share needs at least one client, got {clients}")
    return noise_multiplier * clip / math.sqrt(clients)


def noise_rng(seed: Optional[int] = None) -> np.random.Generator:
    """The generator DP noise is drawn from: PCG64 seeded with 256 bits from os.urandom.

    PCG64 is a statistical generator, not a cryptographic one; seeded from the operating system's
    entropy its state is unknown to anyone else, which is what the noise needs (the released values
    carry the noise plus the signal, never raw generator output). A fixed `seed` is for tests only:
    noise that anyone can regenerate protects nothing.
    """
    if seed is None:
        return np.random.default_rng(np.random.SeedSequence(int.from_bytes(os.urandom(32), "little")))
    return np.random.default_rng(seed)


def add_noise(tensors: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """tensors + N(0, std^2) on every element (float64 draws, float32 result)."""
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"the noise standard deviation must be finite and >= 0, got {std}")
    return {name: (np.asarray(value, np.float64) + rng.normal(0.0, std, np.shape(value))).astype(np.float32)
            for name, value in tensors.items()}


#: an integer noise share is cut at this many standard deviations (P(|N(0,1)| > 12) is about 4e-33)
TAIL_SIGMAS = 12.0


def integer_noise_bound(std: float, unit: float) -> int:
    """The per-element bound on |integer noise| (in units of `unit`) that a share of std `std` needs: what
    secure aggregation's fixed-point encoding must declare (its `noise_bound`) to hold the noise."""
    if not (std >= 0 and math.isfinite(std)) or not (unit > 0 and math.isfinite(unit)):
        raise ValueError(f"integer noise needs std >= 0 and a unit > 0, got {std} and {unit}")
    return math.ceil(TAIL_SIGMAS * std / unit)


def integer_noise(shape, std: float, unit: float, bound: int, rng: np.random.Generator) -> np.ndarray:
    """A distributed-DP noise share for secure aggregation's fixed-point sum: N(0, std^2) in units of
    `unit` (2^-frac_bits), rounded to integers (int64), cut at +-`bound`.

    With std/unit in the hundreds or more (std 1e-3 at 16 fractional bits is 65 units) the rounded draw
    is as good as a discrete Gaussian, and the sum of the clients' shares as good as one Gaussian of the
    summed variance (plus the rounding's 1/12 unit^2 per client, which only adds noise). `bound` must be
    at least `integer_noise_bound(std, unit)`, so the cut never matters in practice (a 12-sigma event).
    """
    need = integer_noise_bound(std, unit)
    if bound < need:
        raise ValueError(f"a noise share of std {std:g} ({std / unit:.1f} units) needs a noise bound of at least "
                         f"{need} units ({TAIL_SIGMAS:g} sigma), the encoding declares {bound}")
    draw = np.rint(rng.normal(0.0, std / unit, shape))
    return np.clip(draw, -bound, bound).astype(np.int64)


def check_clip(clip: float) -> float:
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"the DP clip norm must be a finite number > 0, got {clip}")
    return clip


def _check_names(local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray]) -> None:
    if set(local) != set(global_):
        missing = sorted(set(global_) - set(local))[:3]
        extra = sorted(set(local) - set(global_))[:3]
        raise ValueError(f"the update and the global have different tensors: missing {missing}, extra {extra}")
    for name, value in local.items():
        if np.shape(value) != np.shape(global_[name]):
            raise ValueError(f"tensor {name} has shape {list(np.shape(value))}, the global "
                             f"{list(np.shape(global_[name]))}")
