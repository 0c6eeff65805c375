"""The aggregator's differential-privacy side: which strategy runs, what the round config asks of the devices,
the budget check before a round and the accounting after it. The rules are broker/accountant.py's (pure);
this module only says how the aggregator applies them.

- DP-FedAvg replaces the average: `--strategy fedavg` (the default) becomes `dp-fedavg` with the DP
  settings; a robust strategy cannot be made DP this way (its sensitivity is not the clip norm) and is
  refused.
- Every round's config carries `clip_norm` C, and in distributed mode the noise share each asked device
  adds, z * C / sqrt(asked).
- A DP round never grows its asked set on an extension (the accountant charged q = asked / online when it
  opened); below quorum it waits for the clients it asked.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Iterable, Mapping, Optional

from flora.edge.errors import ConfigError
from flora.edge.protocol import TrainConfig

from .accountant import Decision, DPSettings, PrivacyLedger
from .strategies import DPFedAvg, Strategy

#: strategies DP-FedAvg stands in for (its average is theirs, with clipping and noise)
DP_COMPATIBLE = ("fedavg", "dp-fedavg")


class DPPolicy:
    def __init__(self, settings: DPSettings) -> None:
        self.settings = settings
        self.ledger = PrivacyLedger(settings)

    def strategy(self, name: str, options: Optional[Mapping[str, Any]] = None) -> Strategy:
        """The DP-FedAvg strategy for `--strategy name` (ConfigError for one DP-FedAvg cannot stand in for)."""
        if name not in DP_COMPATIBLE:
            raise ConfigError(f"differential privacy runs DP-FedAvg (clipped deltas, Gaussian noise on their sum); "
                              f"--strategy {name} cannot be combined with it: its sensitivity to one device is not "
                              "the clip norm. Use --strategy fedavg with the --dp-* options")
        extra = dict(options or {})
        seed = extra.pop("noise_seed", None)
        if extra:
            raise ConfigError(f"with the --dp-* options, --strategy-option {sorted(extra)} are not used: the DP "
                              "settings come from --dp-clip, --dp-noise-multiplier and --dp-mode")
        s = self.settings
        return DPFedAvg(clip=s.clip, noise_multiplier=s.noise_multiplier, mode=s.mode,
                        noise_seed=None if seed in (None, "") else int(seed))

    def noise_share(self, asked: int) -> Optional[float]:
        """Distributed mode: the std z * C / sqrt(asked) of each asked device's noise share (None otherwise, or
        with z = 0): `asked` shares sum to N(0, (z C)^2)."""
        s = self.settings
        share = s.noise_multiplier * s.clip / math.sqrt(max(asked, 1)) if s.mode == "distributed" else None
        return share or None

    def train_config(self, train: TrainConfig, asked: int) -> TrainConfig:
        """The round config for a round of `asked` devices: the clip norm, and the noise share in distributed mode."""
        return dataclasses.replace(train, clip_norm=self.settings.clip, noise_std=self.noise_share(asked))

    def resume(self, rows: Iterable[Dict[str, Any]]) -> None:
        """Count the rounds a restarted aggregator already ran (from its history rows)."""
        self.ledger = PrivacyLedger(self.settings, rows)

    def plan(self, asked: int, population: int, min_reports: int) -> Decision:
        return self.ledger.plan(asked, population, min_reports)

    def charge(self, asked: int, population: int, strategy: Strategy, reported: Iterable[str]) -> Dict[str, Any]:
        """The round's accounting, for its history row (after `strategy.finalize`)."""
        z = getattr(strategy, "effective_noise_multiplier", self.settings.noise_multiplier)
        return self.ledger.charge(asked, population, float(z), reported)
