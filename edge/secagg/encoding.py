"""Fixed-point encoding of an update for masking: a declared clip range, stochastic rounding, and a ring
Z_(2^bits) sized so that the sum of every client's encoding can never wrap.

A client encodes `weight * clip(delta)` (its adapter minus the round's global, element-wise clipped
to [-clip, clip]) in units of 2^-frac_bits, with unbiased stochastic rounding, and appends its weight
(its sample count, at most `max_weight`) as one more integer. The server decodes the sum into
sum(w_k * delta_k) and sum(w_k), so FedAvg's weighted mean is their quotient. Each client's rounding
error is below one unit, so the mean is off by less than n * 2^-frac_bits / sum(w_k) <= 2^-frac_bits
per element (`error_bound`), on top of clipping (which a wide enough `clip` avoids: clipped elements
are counted).

The ring is Z_(2^32) or Z_(2^64) (native wrapping integer arithmetic). `required_bits` is the
width that holds the largest possible sum of `clients` encodings in two's complement; a
configuration that needs more than 64 bits, or whose products leave float64's exact range, is
refused.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ..errors import FloraError

WIDTHS = (32, 64)
MAX_EXACT = 2 ** 52  # float64 holds every integer and its fractions' first bit up to here


class EncodingError(FloraError, ValueError):
    """A configuration that could overflow, or an input that cannot be encoded."""


@dataclass(frozen=True)
class Encoding:
    clip: float = 1.0  # |adapter - global| is clipped to this, element-wise
    frac_bits: int = 16  # units of 2^-frac_bits
    max_weight: int = 1 << 16  # a client's weight (its sample count) is capped here
    noise_bound: int = 0  # per element, the largest |integer noise| a client may add (distributed DP)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise EncodingError(f"the clip range must be a positive number, got {self.clip}")
        if not 0 <= self.frac_bits <= 40:
            raise EncodingError(f"frac_bits must be in 0..40, got {self.frac_bits}")
        if not 1 <= self.max_weight <= 2 ** 32:
            raise EncodingError(f"max_weight must be in 1..2^32, got {self.max_weight}")
        if self.noise_bound < 0:
            raise EncodingError(f"noise_bound must be >= 0, got {self.noise_bound}")
        if self.max_weight * self.clip * 2.0 ** self.frac_bits > MAX_EXACT:
            raise EncodingError("max_weight * clip * 2^frac_bits exceeds 2^52: float64 cannot round it exactly; "
                                "lower frac_bits, clip or max_weight")

    @property
    def unit(self) -> float:
        return 2.0 ** -self.frac_bits

    def element_bound(self) -> int:
        """The largest |integer| one client contributes to one element (rounding and noise included)."""
        return math.ceil(self.max_weight * self.clip * 2.0 ** self.frac_bits) + 1 + self.noise_bound

    def required_bits(self, clients: int) -> int:
        """Bits of a two's-complement ring that holds the sum of `clients` encodings without wrapping."""
        if clients < 1:
            raise EncodingError(f"the number of clients must be >= 1, got {clients}")
        largest = clients * max(self.element_bound(), self.max_weight)
        return largest.bit_length() + 1  # one sign bit

    def width(self, clients: int) -> int:
        """The narrowest ring (32 or 64 bits) that holds `clients` encodings; EncodingError if none does."""
        need = self.required_bits(clients)
        for bits in WIDTHS:
            if need <= bits:
                return bits
        raise EncodingError(f"{clients} clients with clip {self.clip}, frac_bits {self.frac_bits} and max_weight "
                            f"{self.max_weight} need a {need}-bit ring, more than 64: the sum could overflow")

    def check(self, clients: int, bits: int) -> None:
        """Refuse a ring of `bits` that the sum of `clients` encodings could overflow."""
        if bits not in WIDTHS:
            raise EncodingError(f"the ring must have 32 or 64 bits, got {bits}")
        need = self.required_bits(clients)
        if need > bits:
            raise EncodingError(f"{clients} clients need a {need}-bit ring; {bits} bits could overflow")

    def error_bound(self, clients: int, total_weight: int) -> float:
        """The largest quantization error of one element of the decoded weighted mean."""
        return clients * self.unit / max(total_weight, 1)


def dtype_of(bits: int) -> np.dtype:
    return np.dtype(np.uint32 if bits == 32 else np.uint64)


@dataclass(frozen=True)
class Encoded:
    values: np.ndarray  # uint32/uint64, the delta's elements then the weight
    clipped: int  # elements that were clipped to the range


def encode(delta: np.ndarray, weight: int, enc: Encoding, bits: int, *, noise: Optional[np.ndarray] = None,
           rng: Optional[np.random.Generator] = None) -> Encoded:
    """`weight * clip(delta)` in fixed point, stochastically rounded, plus `noise` (integers, |noise| <=
    noise_bound, added before masking: the hook for distributed DP), then the weight; in Z_(2^bits)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)) or weight < 1:
        raise EncodingError(f"the weight must be a positive integer, got {weight!r}")
    if weight > enc.max_weight:
        raise EncodingError(f"the weight {weight} exceeds max_weight {enc.max_weight}: cap it first")
    flat = np.asarray(delta, dtype=np.float64).ravel()
    if not np.all(np.isfinite(flat)):
        raise EncodingError("the update is not finite")
    clipped = int(np.count_nonzero(np.abs(flat) > enc.clip))
    scaled = np.clip(flat, -enc.clip, enc.clip) * (float(weight) * 2.0 ** enc.frac_bits)
    rng = rng if rng is not None else np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
    ints = np.floor(scaled + rng.random(len(scaled))).astype(np.int64)  # E[ints] = scaled
    if noise is not None:
        noise = np.asarray(noise)
        if noise.shape != ints.shape or not np.issubdtype(noise.dtype, np.integer):
            raise EncodingError(f"noise must be {ints.shape} integers, got {noise.shape} {noise.dtype}")
        if enc.noise_bound == 0 or int(np.max(np.abs(noise), initial=0)) > enc.noise_bound:
            raise EncodingError(f"noise beyond the declared noise_bound {enc.noise_bound}")
        ints = ints + noise.astype(np.int64)
    out = np.empty(len(ints) + 1, dtype_of(bits))
    out[:-1] = ints.astype(dtype_of(bits))  # two's complement: wraps negatives into the ring
    out[-1] = weight
    return Encoded(out, clipped)


def decode_sum(total: np.ndarray, enc: Encoding) -> Tuple[np.ndarray, int]:
    """(sum of weight * delta as float64, sum of weights) from the unmasked sum of encodings."""
    bits = total.dtype.itemsize * 8
    signed = total[:-1].view(np.int32 if bits == 32 else np.int64)
    weight = int(total[-1])
    return signed.astype(np.float64) * enc.unit, weight
