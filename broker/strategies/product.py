"""Product-space averaging with SVD truncation back to rank r (FlexLoRA-style, Bai et al. 2024).

Per LoRA target the server forms the exact weighted mean of the clients' weight changes,
P = sum_k n_k B_k A_k / sum_k n_k, and factors it back to the adapter's rank r by a truncated SVD,
P ~ U_r S_r V_r^T, with B = U_r sqrt(S_r) and A = sqrt(S_r) V_r^T (the two factors equally scaled).
The result is the best rank-r approximation of the exact mean (Eckart-Young); FedAvg's
mean(B) @ mean(A) is not, and differs from the exact mean by the clients' cross terms. Each round's
history row reports both errors relative to the exact mean: `separate_vs_exact_rel_error` (FedAvg's)
and `svd_truncation_rel_error` (this strategy's; 0 when rank(P) <= r, e.g. a single client).

Memory is flat in the number of updates: `lowrank.ProductSums` (one d_out x d_in float64 matrix per
target) plus FedAvg's running sums of A and B for the comparison.

The factors are a new basis every round (the SVD's rotation), so client-side Adam moments kept across
rounds refer to the old one; `--reset-optimizer` avoids mixing them.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from flora.edge.bundle import TensorSpec

from .base import Strategy
from .fedavg import FedAvg
from .lowrank import ProductSums, relative_error, separate_products


class ProductSVD(Strategy):
    name = "flexlora"

    def __init__(self) -> None:
        self._avg = FedAvg()
        self._products: Optional[ProductSums] = None
        self._diagnostics: Dict[str, Any] = {}

    def begin_round(self, specs: Sequence[TensorSpec], current_global: Mapping[str, np.ndarray]) -> None:
        self._avg.begin_round(specs, current_global)
        self._products = ProductSums(specs)
        self._diagnostics = {}

    def accumulate(self, tensors: Mapping[str, np.ndarray], num_samples: int) -> None:
        if self._products is None:
            raise RuntimeError("accumulate() before begin_round()")
        self._avg.accumulate(tensors, num_samples)  # checks the weight before any sum is touched
        self._products.add(tensors, float(num_samples))

    def finalize(self) -> Optional[Dict[str, np.ndarray]]:
        separate = self._avg.finalize()
        if separate is None or self._products is None:
            return None
        exact = self._products.means(float(self._avg.total_samples))
        if not all(np.isfinite(p).all() for p in exact.values()):
            raise ValueError("the mean of the B @ A products is not finite")
        out: Dict[str, np.ndarray] = {}
        kept = dropped = 0.0
        for target, a_name, b_name in self._products.pairs:
            rank = separate[a_name].shape[0]
            u, s, vt = np.linalg.svd(exact[target], full_matrices=False)
            root = np.sqrt(s[:rank])
            out[b_name] = (u[:, :rank] * root).astype(np.float32)
            out[a_name] = (root[:, None] * vt[:rank]).astype(np.float32)
            kept += float(np.sum(s ** 2))
            dropped += float(np.sum(s[rank:] ** 2))
        self._diagnostics = {
            "separate_vs_exact_rel_error": relative_error(separate_products(separate, self._products.pairs), exact),
            "svd_truncation_rel_error": math.sqrt(dropped / kept) if kept > 0 else 0.0,
        }
        return out

    @property
    def count(self) -> int:
        return self._avg.count

    def round_info(self) -> Dict[str, Any]:
        return dict(self._diagnostics)
