"""A poisoned device for `flora-sim --malicious K --attack KIND`: flora-agent with its update rewritten.

    python -m flora.sim.poisoned_agent --attack scale:100 [--attack-seed N] <flora-agent options>

It runs the real agent (flora.edge.cli, same options, same protocol) with `PoisonedAgent`, whose
`update_tensors` sends what the attack makes of the honestly trained update (sim/attacks.py), and
skips the DP clip an honest device applies: an attacker does not clip itself. A label-flip attacker
needs no rewriting (its data is flipped where the simulator writes it) and runs plain flora-agent.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Dict, List, Optional

import numpy as np

from flora.edge import cli as agent_cli
from flora.edge.agent import Agent
from flora.edge.protocol import RoundAnnouncement

from .attacks import Attack, AttackError

log = logging.getLogger("flora.agent")


def poisoned(attack: Attack, seed: int) -> type:
    """An Agent subclass that sends `attack`'s rewrite of every update."""

    class PoisonedAgent(Agent):
        _rng = np.random.default_rng(seed)

        def update_tensors(self, r: RoundAnnouncement) -> Dict[str, np.ndarray]:
            assert self.global_ is not None
            honest = self.trainer.get_adapter()
            log.warning("round %d: POISONED update (%s)", r.round, attack.describe)
            return attack.poison_update(honest, self.global_.adapter.as_float32(), self._rng)

    return PoisonedAgent


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="flora-sim poisoned agent", add_help=False)
    parser.add_argument("--attack", required=True)
    parser.add_argument("--attack-seed", type=int, default=0)
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        attack = Attack.parse(args.attack)
    except AttackError as exc:
        print(f"poisoned agent: error: {exc}", file=sys.stderr)
        return 2
    if not attack.poisons_model:
        return agent_cli.main(rest)
    return agent_cli.main(rest, agent_class=poisoned(attack, args.attack_seed))


if __name__ == "__main__":
    sys.exit(main())
