"""Coordinate-wise median (Yin et al. 2018): each coordinate of the new global is the median of the
updates' values there, computed on each update's delta from the round's global.

With n updates, fewer than n/2 attackers cannot move any coordinate outside the range of the honest
values, however large their updates. Unweighted: a device's claimed num_samples gives it no extra
say (it is still checked to be a positive integer). It keeps every update of the round (bounded:
see buffered.py) and needs each one on its own, so it cannot run under secure aggregation.
"""

from __future__ import annotations

import numpy as np

from .buffered import BufferedDeltas


class CoordinateMedian(BufferedDeltas):
    name = "median"

    def combine(self, deltas: np.ndarray) -> np.ndarray:
        return np.median(deltas, axis=0)
