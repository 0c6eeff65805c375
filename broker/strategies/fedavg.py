"""FedAvg as in FLORA: each LoRA tensor (A and B separately) averaged, weighted by sample counts.

global = sum_k n_k * update_k / sum_k n_k, with n_k the client's `num_samples`. The current global
plays no part: FLORA's server replaces it by the weighted mean of the clients' adapters.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from flora.edge.adapter import FlatTensors, Layout, layout_of
from flora.edge.bundle import TensorSpec

from .base import Strategy
from .lowrank import ProductSums, relative_error, separate_products
from .options import Option, boolean

#: elements of the float64 scratch buffer (256 KiB): small enough to stay in cache between the multiply
#: and the add, which makes the fold about a quarter faster than one pass through a full-size buffer
CHUNK = 32768


class FedAvg(Strategy):
    """Running weighted sums in float64, in one flat buffer in the adapter blob's own layout, divided
    once at the end. An update in that layout (every agent's) is folded in as one flat array; any
    other is folded in tensor by tensor into the same buffer."""

    name = "fedavg"
    options: ClassVar[Dict[str, Option]] = {
        "product_error": Option(boolean, False, "also report each round's relative error of mean(B) @ mean(A) "
                                                "against the exact mean of the B @ A products"),
    }

    def __init__(self, product_error: bool = False) -> None:
        """`product_error`: also keep the exact mean of the B @ A products (lowrank.ProductSums: one
        d_out x d_in float64 matrix per target) to report how far FedAvg's mean(B) @ mean(A) is from it."""
        self.product_error = bool(product_error)
        self._products: Optional[ProductSums] = None
        self._diagnostics: Dict[str, Any] = {}
        self._layout: Optional[Layout] = None
        self._sum = np.zeros(0, np.float64)
        self._by_name: Dict[str, np.ndarray] = {}  # flat views of _sum, by tensor name
        self._scratch = np.full(CHUNK, 0.0)
        self._weight = 0
        self._count = 0

    def begin_round(self, specs: Sequence[TensorSpec], current_global: Mapping[str, np.ndarray]) -> None:
        self._layout = layout_of(tuple(specs))
        self._sum = np.full(self._layout.numel, 0.0)  # np.full writes every page now, not on the first update
        self._by_name = {name: self._sum[a:b] for name, _, a, b in self._layout.entries}
        self._weight = 0
        self._count = 0
        self._products = ProductSums(specs) if self.product_error else None
        self._diagnostics = {}

    def accumulate(self, tensors: Mapping[str, np.ndarray], num_samples: int) -> None:
        weight = _as_weight(num_samples)  # checked before any sum is touched
        if self._layout is None:
            raise RuntimeError("accumulate() before begin_round()")
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow shows as inf: the caller checks
            if isinstance(tensors, FlatTensors) and tensors.layout is self._layout:
                self._fold(tensors.flat, self._sum, weight)
            else:
                for name, total in self._by_name.items():
                    self._fold(np.ravel(tensors[name]), total, weight)
        if self._products is not None:
            self._products.add(tensors, weight)
        self._weight += num_samples
        self._count += 1

    folds_partials = True

    def accumulate_partial(self, weighted_sum: Mapping[str, np.ndarray], total_weight: int) -> None:
        """A site's sum_i n_i u_i is added as it is (no multiply): the root's sums are then the flat ones.
        A partial holds no products, so a round with one reports no `product_error`."""
        _as_weight(total_weight)
        if self._layout is None:
            raise RuntimeError("accumulate_partial() before begin_round()")
        self._products = None
        with np.errstate(over="ignore", invalid="ignore"):
            if isinstance(weighted_sum, FlatTensors) and weighted_sum.layout is self._layout:
                self._sum += weighted_sum.flat
            else:
                for name, total in self._by_name.items():
                    total += np.ravel(weighted_sum[name])
        self._weight += total_weight
        self._count += 1

    def partial(self) -> Optional[Tuple[Dict[str, np.ndarray], int]]:
        if self._count == 0:
            return None
        assert self._layout is not None
        return self._layout.split(self._sum.copy()), self._weight

    def _fold(self, values: np.ndarray, total: np.ndarray, weight: float) -> None:
        """total += weight * values in float64, one cache-sized chunk at a time."""
        for start in range(0, len(values), CHUNK):
            part = self._scratch[: min(CHUNK, len(values) - start)]
            np.multiply(values[start : start + CHUNK], weight, out=part, dtype=np.float64)
            target = total[start : start + CHUNK]
            target += part

    def finalize(self) -> Optional[Dict[str, np.ndarray]]:
        if self._count == 0:
            return None
        try:
            weight = float(self._weight)  # exact below 2**53
        except OverflowError:
            raise ValueError(f"the round's total weight ({len(str(self._weight))} digits) is too large for float64"
                             ) from None
        assert self._layout is not None
        with np.errstate(over="ignore", invalid="ignore"):  # the caller checks that the result is finite
            mean = (self._sum / weight).astype(np.float32)
        result = self._layout.split(mean)
        if self._products is not None:
            exact = self._products.means(weight)
            self._diagnostics = {"separate_vs_exact_rel_error": relative_error(
                separate_products(result, self._products.pairs), exact)}
        return result

    def round_info(self) -> Dict[str, Any]:
        return dict(self._diagnostics)

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_samples(self) -> int:
        return self._weight


def _as_weight(num_samples: int) -> float:
    """num_samples as a float64 weight; ValueError unless it is a positive integer a float64 holds."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    try:
        weight = float(num_samples)
    except OverflowError:
        raise ValueError(f"num_samples {str(num_samples)[:12]}… is too large for a float64 weight") from None
    if not math.isfinite(weight):  # pragma: no cover - float() of an int raises rather than return inf
        raise ValueError(f"num_samples {num_samples} is not a finite weight")
    return weight
