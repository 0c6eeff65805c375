"""What the strategies that work on deltas share: the round's global as one flat array, an update's delta.

An update's delta is its change to the round's global adapter, in the adapter blob's flat layout
(tensor after tensor, as `edge.adapter.layout_of` orders them). Every agent's blob is in that layout
already, so the update is one array and the delta one subtraction.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from flora.edge.adapter import FlatTensors, Layout


def flat_global(current_global: Mapping[str, np.ndarray], layout: Layout) -> np.ndarray:
    """The round's global adapter as one float64 array in `layout`; ValueError if a tensor is missing or
    has another shape."""
    out = np.empty(layout.numel, np.float64)
    for name, shape, a, b in layout.entries:
        if name not in current_global:
            raise ValueError(f"the round's global adapter lacks tensor {name}: a delta strategy needs it")
        value = np.asarray(current_global[name])
        if value.shape != shape:
            raise ValueError(f"the round's global tensor {name} has shape {list(value.shape)}, expected {list(shape)}")
        out[a:b] = value.ravel()
    return out


def flat_values(tensors: Mapping[str, np.ndarray], layout: Layout) -> np.ndarray:
    """An update as one flat array in `layout`: a view for an agent's blob, else gathered tensor by tensor."""
    if isinstance(tensors, FlatTensors) and tensors.layout is layout:
        return tensors.flat
    out = np.empty(layout.numel, np.float64)
    for name, _, a, b in layout.entries:
        out[a:b] = np.ravel(tensors[name])
    return out


def delta_of(tensors: Mapping[str, np.ndarray], global_flat: np.ndarray, layout: Layout) -> np.ndarray:
    """update - global, float64 (a new array)."""
    return np.subtract(flat_values(tensors, layout), global_flat, dtype=np.float64)


def l2(values: np.ndarray) -> float:
    """L2 norm in float64 (inf if it overflows)."""
    with np.errstate(over="ignore"):
        return math.sqrt(float(np.dot(values, values)))


def check_weight(num_samples: int) -> int:
    """num_samples if it is a positive integer (not a bool), else ValueError; unweighted strategies check it too."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    return int(num_samples)
