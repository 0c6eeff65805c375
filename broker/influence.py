"""How much one client may move a round's global: aggregator policy applied whatever the strategy (pure).

Three bounds, each with a reason code when it refuses an update:
- `over-declared`: an update's num_samples is above what the device declared in its latest status
  (a device's weight is its own data set's size, which it states before it trains);
- the share cap: no client carries more than `max_share` of a round's total weight unless it is the only
  one; weights above the cap are lowered to it (`capped_weights`, exact water-filling), never refused;
- `norm-outlier`: an update whose distance from the round's global (the L2 norm of its delta) is more
  than `norm_factor` times the median of the *other* updates' norms (leave-one-out, so two clients check
  each other; a round's only update is compared with the median of earlier rounds) is refused, or with
  `clip` scaled down to that bound.

The aggregator folds updates as they arrive; at the close it asks `decide` for the final weights and
scales, and re-folds the round's durable updates only when a bound changed something, so the common round
costs nothing extra and any streaming strategy composes with the policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import median
from typing import Dict, Mapping, Optional, Sequence

OVER_DECLARED = "over-declared"
NORM_OUTLIER = "norm-outlier"
REASONS = (OVER_DECLARED, NORM_OUTLIER)
NORM_ACTIONS = ("reject", "clip")


@dataclass(frozen=True)
class InfluencePolicy:
    max_share: float = 0.5  # 1.0: no cap
    norm_factor: float = 10.0  # 0: no norm bound
    norm_action: str = "reject"
    check_declared: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.max_share <= 1:
            raise ValueError(f"--max-client-share must be in (0, 1], got {self.max_share}")
        if self.norm_factor < 0 or (0 < self.norm_factor < 1):
            raise ValueError(f"--norm-bound must be 0 (off) or >= 1, got {self.norm_factor}")
        if self.norm_action not in NORM_ACTIONS:
            raise ValueError(f"--norm-bound-action must be one of {NORM_ACTIONS}, got {self.norm_action!r}")

    def over_declared(self, num_samples: int, declared: Optional[int]) -> Optional[str]:
        """Why an update's num_samples is refused against the device's declared number, or None."""
        if not self.check_declared or declared is None or num_samples <= declared:
            return None
        return f"num_samples={num_samples} is above the {declared} the device declared in its status"


def capped_weights(weights: Mapping[str, float], max_share: float) -> Dict[str, float]:
    """`weights` with each lowered to at most `max_share` of the capped total (the fewest, smallest changes):
    the largest are cut to a common cap c with c = max_share * sum(min(w, c)). One client, or a share
    no set of weights can meet (max_share < 1/n), leaves them at the cap that makes them all equal."""
    items = sorted(weights.items(), key=lambda kv: -kv[1])
    n = len(items)
    if n <= 1 or max_share >= 1:
        return dict(weights)
    total = float(sum(w for _, w in items))
    if max_share * n <= 1:  # every client at the same weight is the closest one can get
        top = items[-1][1]
        return {c: float(top) for c, _ in items}
    rest = total
    for k in range(n):  # the top k are capped at c, the others keep their weight
        c = max_share * rest / (1 - max_share * k)
        if items[k][1] <= c:
            return {cl: (min(float(w), c) if i < k else float(w)) for i, (cl, w) in enumerate(items)}
        rest -= items[k][1]
    raise AssertionError("unreachable: max_share * n > 1 always admits a cap")  # pragma: no cover


@dataclass(frozen=True)
class Decision:
    """The final weight and scale of one update (scale 1: as sent; < 1: its delta clipped), or its refusal."""

    weight: float
    scale: float = 1.0
    refused: Optional[str] = None  # a reason code
    detail: str = ""


@dataclass
class RoundInfluence:
    """What the policy sees of a round: each accepted update's weight and delta norm."""

    weights: Dict[str, float] = field(default_factory=dict)
    norms: Dict[str, float] = field(default_factory=dict)

    def add(self, client: str, weight: float, norm: float) -> None:
        self.weights[client] = float(weight)
        self.norms[client] = float(norm)


def decide(policy: InfluencePolicy, rnd: RoundInfluence, earlier_medians: Sequence[float] = ()) -> Dict[str, Decision]:
    """Each accepted update's final weight and scale (norm bound first, then the share cap over what is kept)."""
    out: Dict[str, Decision] = {}
    scales: Dict[str, float] = {}
    for client, norm in rnd.norms.items():
        bound = _norm_bound(policy, client, rnd.norms, earlier_medians)
        if bound is None or norm <= bound:
            scales[client] = 1.0
        elif policy.norm_action == "clip":
            scales[client] = bound / norm
        else:
            out[client] = Decision(0.0, refused=NORM_OUTLIER,
                                   detail=f"update norm {norm:.4g} is over {policy.norm_factor:g} x the median "
                                          f"{bound / policy.norm_factor:.4g} of the round's other updates")
    kept = {c: rnd.weights[c] for c in rnd.weights if c not in out}
    for client, weight in capped_weights(kept, policy.max_share).items():
        out[client] = Decision(weight, scales.get(client, 1.0))
    return out


def _norm_bound(policy: InfluencePolicy, client: str, norms: Mapping[str, float],
                earlier_medians: Sequence[float]) -> Optional[float]:
    if policy.norm_factor == 0:
        return None
    others = [n for c, n in norms.items() if c != client and math.isfinite(n)]
    reference = median(others) if others else (median(earlier_medians) if earlier_medians else None)
    if reference is None or reference <= 0:
        return None
    return policy.norm_factor * reference


def changed(decisions: Mapping[str, Decision], weights: Mapping[str, float]) -> bool:
    """Whether the decisions differ from folding every update as it came (a re-fold is needed)."""
    return any(d.refused or d.scale != 1.0 or d.weight != weights[c] for c, d in decisions.items())
