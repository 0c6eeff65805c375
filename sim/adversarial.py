"""What flora-sim adds for privacy and robustness: the aggregator's DP options, the
noise calibrated to a target epsilon, and the poisoned devices (`--malicious K --attack KIND`).

The options go to the real flora-aggregator and flora-agent processes unchanged; an attacker is started as
`flora.sim.poisoned_agent` (a model-poisoning attack) or as a plain agent trained on flipped labels
(label-flip, written into its data CSV). Which clients attack is seeded (`sim.attacks.choose_attackers`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from .attacks import Attack, AttackError, choose_attackers

AGENT_MODULE = "flora.edge.cli"
POISONED_MODULE = "flora.sim.poisoned_agent"


class Threats:
    """The run's attack (if any), its attackers and the DP noise it asks for, checked before anything starts."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        if cfg.malicious and not cfg.attack:
            raise AttackError("--malicious needs --attack sign-flip[:X]|scale:X|noise[:S]|label-flip")
        if cfg.attack and not cfg.malicious:
            raise AttackError("--attack needs --malicious K (how many of the clients attack)")
        self.attack: Optional[Attack] = Attack.parse(cfg.attack) if cfg.attack else None
        self.attackers: List[int] = choose_attackers(cfg.clients, cfg.malicious, cfg.seed) if self.attack else []
        self.noise_multiplier = self._noise_multiplier()

    def _noise_multiplier(self) -> Optional[float]:
        cfg = self.cfg
        if cfg.dp_epsilon is not None and cfg.dp_noise_multiplier is not None:
            raise AttackError("give --dp-epsilon (the noise is calibrated to it) or --dp-noise-multiplier, not both")
        if (cfg.dp_epsilon is not None or cfg.dp_noise_multiplier is not None) and cfg.dp_clip is None:
            raise AttackError("the DP options need --dp-clip C (the clip norm turns DP on)")
        if cfg.dp_epsilon is None:
            return cfg.dp_noise_multiplier
        from flora.broker.accountant import noise_for_epsilon

        return noise_for_epsilon(cfg.dp_epsilon, cfg.rounds, 1.0, cfg.dp_delta, cfg.dp_accountant)  # all every round

    def aggregator_args(self) -> List[str]:
        """The aggregator's DP options (its --strategy and --strategy-option come from sim.run.aggregator_args)."""
        cfg = self.cfg
        args: List[str] = []
        if cfg.dp_clip is not None:
            args += ["--dp-clip", repr(float(cfg.dp_clip)), "--dp-noise-multiplier", repr(float(self.noise_multiplier
                     if self.noise_multiplier is not None else 1.0)), "--dp-delta", repr(float(cfg.dp_delta)),
                     "--dp-accountant", cfg.dp_accountant, "--dp-mode", cfg.dp_mode]
            if cfg.dp_max_epsilon is not None:
                args += ["--dp-max-epsilon", repr(float(cfg.dp_max_epsilon))]
        return args

    def agent(self, i: int) -> Tuple[str, List[str]]:
        """(module, extra arguments) of client i's process."""
        if self.attack is None or i not in self.attackers or not self.attack.poisons_model:
            return AGENT_MODULE, []
        return POISONED_MODULE, ["--attack", self.attack.describe, "--attack-seed", str(self.cfg.seed + i)]

    def label_names(self, i: int, classes: Sequence[str]) -> List[str]:
        """The class name written for each label in client i's data CSV: flipped for a label-flip attacker."""
        names = list(classes)
        if self.attack is not None and i in self.attackers and not self.attack.poisons_model:
            return [names[int(j)] for j in self.attack.poison_labels(list(range(len(names))), len(names))]
        return names

    def report(self) -> Dict[str, Any]:
        return {"strategy": self.cfg.strategy, "strategy_options": list(self.cfg.strategy_options),
                "attack": self.attack.describe if self.attack else None, "malicious": len(self.attackers),
                "attackers": [f"client-{i}" for i in self.attackers],
                "dp": None if self.cfg.dp_clip is None else {
                    "clip": self.cfg.dp_clip, "noise_multiplier": self.noise_multiplier,
                    "target_epsilon": self.cfg.dp_epsilon, "delta": self.cfg.dp_delta,
                    "max_epsilon": self.cfg.dp_max_epsilon, "accountant": self.cfg.dp_accountant,
                    "mode": self.cfg.dp_mode}}
