"""Server optimizers on the averaged update (FedOpt, Reddi et al. 2021, "Adaptive Federated Optimization").

Each round the FedAvg mean of the clients' adapters minus the current global is the pseudo-gradient
delta (per tensor, A and B alike), and the server steps with it:

- FedAvgM (Hsu et al. 2019): m = beta * m + delta;  x = x + server_lr * m            (0.9, 1.0)
- FedAdam:  m = b1 m + (1 - b1) delta;  v = b2 v + (1 - b2) delta^2;  x = x + lr m / (sqrt(v) + tau)
- FedYogi:  as FedAdam, but v = v - (1 - b2) delta^2 sign(v - delta^2)

FedAdam and FedYogi use Reddi et al.'s defaults b1 = 0.9, b2 = 0.99, tau = 1e-3, v starting at tau^2,
no bias correction; their server lr was tuned per task in the paper, here it defaults to 1e-2
(`--server-lr`). With server_lr 1 and beta 0, FedAvgM is FedAvg.

The moments live in float64, are proposed by `finalize` and adopted by `commit` once the aggregator
accepts the round, and are checkpointed with every global (`state_dict`), so a restart resumes them
exactly. Memory: three float64 copies of the adapter (current global, m, v), flat in the number of updates.
"""

from __future__ import annotations

import math
from typing import ClassVar, Dict, Mapping, Optional, Sequence

import numpy as np

from flora.edge.bundle import TensorSpec
from flora.edge.errors import ConfigError

from .base import Strategy
from .fedavg import FedAvg
from .options import Option, positive_float, unit_interval

STEP = "step"  # state key of the server's step count


class ServerOptimizer(Strategy):
    """FedAvg's mean as a pseudo-gradient for a server-side optimizer (subclasses define `_step`)."""

    moments = ("m",)

    def __init__(self, server_lr: float) -> None:
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ConfigError(f"server lr must be a positive number, got {server_lr}")
        self.server_lr = float(server_lr)
        self._avg = FedAvg()
        self._current: Dict[str, np.ndarray] = {}
        self._state: Dict[str, np.ndarray] = {}
        self._proposed: Optional[Dict[str, np.ndarray]] = None
        self.steps = 0

    def begin_round(self, specs: Sequence[TensorSpec], current_global: Mapping[str, np.ndarray]) -> None:
        self._avg.begin_round(specs, current_global)
        self._current = {s.name: np.asarray(current_global[s.name], np.float64) for s in specs}
        for s in specs:
            for m in self.moments:
                key = f"{m}.{s.name}"
                if key not in self._state or self._state[key].shape != tuple(s.shape):
                    self._state[key] = np.full(tuple(s.shape), self._initial(m))
        self._proposed = None

    def _initial(self, moment: str) -> float:
        return 0.0

    def accumulate(self, tensors: Mapping[str, np.ndarray], num_samples: int) -> None:
        self._avg.accumulate(tensors, num_samples)

    folds_partials = True  # the pseudo-gradient comes from FedAvg's mean, which sites can fold for it

    def accumulate_partial(self, weighted_sum: Mapping[str, np.ndarray], total_weight: int) -> None:
        self._avg.accumulate_partial(weighted_sum, total_weight)

    def finalize(self) -> Optional[Dict[str, np.ndarray]]:
        mean = self._avg.finalize()
        if mean is None:
            return None
        proposed: Dict[str, np.ndarray] = {}
        out: Dict[str, np.ndarray] = {}
        with np.errstate(over="ignore", invalid="ignore"):  # the aggregator refuses a non-finite global
            for name, x in self._current.items():
                delta = np.asarray(mean[name], np.float64) - x
                step = self._step(name, delta, proposed)
                out[name] = (x + self.server_lr * step).astype(np.float32)
        self._proposed = proposed
        return out

    def _step(self, name: str, delta: np.ndarray, proposed: Dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, **{k: getattr(self, k) for k in self.options if hasattr(self, k)}}

    def commit(self) -> None:
        if self._proposed is not None:
            self._state.update(self._proposed)
            self.steps += 1
            self._proposed = None

    @property
    def count(self) -> int:
        return self._avg.count

    def state_dict(self) -> Dict[str, np.ndarray]:
        return {**{k: v.copy() for k, v in self._state.items()}, STEP: np.array([self.steps], np.int64)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if not state:
            return  # a fresh state dir
        known = {k for k in state if k != STEP}
        bad = [k for k in known if k.split(".", 1)[0] not in self.moments]
        if bad or STEP not in state:
            raise ValueError(f"the checkpointed server state does not belong to {self.name}: {sorted(bad)[:3]}")
        self._state = {k: np.array(state[k], np.float64) for k in known}
        self.steps = int(np.asarray(state[STEP]).reshape(-1)[0])


class FedAvgM(ServerOptimizer):
    name = "fedavgm"
    options: ClassVar[Dict[str, Option]] = {
        "server_lr": Option(positive_float, 1.0, "the server's step size on the momentum"),
        "momentum": Option(unit_interval, 0.9, "beta of the server momentum"),
    }

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(server_lr)
        self.momentum = float(momentum)

    def _step(self, name: str, delta: np.ndarray, proposed: Dict[str, np.ndarray]) -> np.ndarray:
        m = self.momentum * self._state[f"m.{name}"] + delta
        proposed[f"m.{name}"] = m
        return m


class FedAdam(ServerOptimizer):
    name = "fedadam"
    moments = ("m", "v")
    options: ClassVar[Dict[str, Option]] = {
        "server_lr": Option(positive_float, 1e-2, "the server's step size"),
        "beta1": Option(unit_interval, 0.9, "first-moment decay"),
        "beta2": Option(unit_interval, 0.99, "second-moment decay"),
        "tau": Option(positive_float, 1e-3, "adaptivity (added to sqrt(v); v starts at tau^2)"),
    }

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(server_lr)
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)

    def _initial(self, moment: str) -> float:
        return self.tau ** 2 if moment == "v" else 0.0

    def _second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * g2

    def _step(self, name: str, delta: np.ndarray, proposed: Dict[str, np.ndarray]) -> np.ndarray:
        m = self.beta1 * self._state[f"m.{name}"] + (1.0 - self.beta1) * delta
        v = self._second_moment(self._state[f"v.{name}"], delta * delta)
        proposed[f"m.{name}"], proposed[f"v.{name}"] = m, v
        return m / (np.sqrt(v) + self.tau)


class FedYogi(FedAdam):
    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta2) * g2 * np.sign(v - g2)
