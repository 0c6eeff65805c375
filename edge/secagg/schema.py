"""The wire schema of the secure-aggregation parameters (`SecAggParams`), as the `round` message carries them.

Kept apart from params.py so that edge.protocol can declare the round message with it (params.py needs the
messages module, which needs edge.protocol)."""

from __future__ import annotations

from ..wire import Float, Int, Object

ENCODING = Object({
    "clip": Float(gt=0.0, hi=1e9),
    "frac_bits": Int(0, 40),
    "max_weight": Int(1, 2 ** 32),
    "noise_bound": Int(0, 2 ** 62),
})

PARAMS = Object({
    "shares": Int(2, 1024),
    "threshold": Int(2, 1024),
    "clients": Int(2, 100_000),
    "bits": Int(32, 64),
    "encoding": ENCODING,
    "stage_timeout_s": Float(gt=0.0, hi=1e6),
    "min_survivors": Int(2, 100_000),
})
