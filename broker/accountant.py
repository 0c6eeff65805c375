"""The privacy accountant of a DP federation: epsilon at the configured delta after every round, and the
stop-at-budget rule. Pure (no I/O, no clock); every figure comes from Google's `dp-accounting`.

Each DP round is a sampled Gaussian mechanism: the round asked `asked` of the `population` clients
online when it opened (q = asked / population) and its sum carried noise of multiplier z (DP-FedAvg,
strategies/dp_fedavg.py). The rounds compose; `epsilon(events, delta)` is the epsilon of all of them.

The model and what it assumes, said plainly:
- Sampling: the aggregator asks a fixed number of online clients, chosen uniformly (rounds.Sampling);
  the accountant models each round as Poisson sampling with q = asked / population, the usual
  approximation for fixed-size batches (TensorFlow Privacy, Opacus and Flower account the same way).
  The amplification holds against an observer of the released globals who does not know who was
  asked. The `round` message names the asked clients, so a participant who reads it knows whether a
  device took part: against it, a device's guarantee is the composition of the rounds it took part
  in, unamplified (`epsilon_sampling_known`, computed for the device asked most often).
- Neighbouring: add or remove one device (user-level DP: all of a device's data at once).
- Accountants: "pld" (privacy loss distributions, the tightest; default) or "rdp" (Renyi DP, looser,
  faster). Both give upper bounds. Rounds with equal (q, z) are composed at once; to keep the number of
  distinct rounds small, q is rounded *up* to 3 significant digits (that only adds epsilon, so the
  bound stays an upper bound). The PLD grid is `PLD_DISCRETIZATION` (pessimistic, as
  the library rounds: measured 54.38 vs 54.38 at 1e-4 for 50 full rounds at z=1, 6-15x faster).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Tuple

from flora.edge.errors import ConfigError

ACCOUNTANTS = ("pld", "rdp")
DEFAULT_DELTA = 1e-5
PLD_DISCRETIZATION = 1e-3
SIGNIFICANT = 3


class AccountingError(ConfigError):
    """A DP setting the accountant cannot work with (or no accountant installed)."""


def _library() -> Any:
    """Google's dp_accounting, imported on first use (it pulls in scipy; an aggregator without DP never needs it)."""
    try:
        import dp_accounting
        from dp_accounting.pld import pld_privacy_accountant  # noqa: F401
        from dp_accounting.rdp import rdp_privacy_accountant  # noqa: F401
    except ImportError as exc:
        raise AccountingError(f"differential privacy needs Google's dp-accounting (Python 3.10+; it comes with "
                              f"pip install 'flora-edge[broker]'): {exc}") from exc
    return dp_accounting


@dataclass(frozen=True)
class RoundEvent:
    """One DP round: sampling probability q and noise multiplier z."""

    q: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not 0 <= self.q <= 1:
            raise AccountingError(f"a round's sampling probability must lie in [0, 1], got {self.q}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise AccountingError(f"a round's noise multiplier must be finite and >= 0, got {self.noise_multiplier}")

    @classmethod
    def of_round(cls, asked: int, population: int, noise_multiplier: float) -> RoundEvent:
        """The round that asked `asked` of `population` online clients."""
        if asked < 1 or population < 1:
            raise AccountingError(f"a DP round needs asked >= 1 and population >= 1, got {asked} of {population}")
        return cls(min(1.0, asked / max(population, asked)), float(noise_multiplier))

    def to_json(self) -> dict:
        return {"q": self.q, "noise_multiplier": self.noise_multiplier}

    @classmethod
    def from_json(cls, d: dict) -> RoundEvent:
        return cls(float(d["q"]), float(d["noise_multiplier"]))


def round_q(q: float) -> float:
    """q rounded up to SIGNIFICANT digits (never above 1): what the accountant charges for q."""
    if q <= 0 or q >= 1:
        return min(max(q, 0.0), 1.0)
    exponent = math.floor(math.log10(q)) - (SIGNIFICANT - 1)  # q = steps * 10**exponent
    scale = 10 ** -exponent  # an exact int: dividing by it rounds correctly
    return min(1.0, math.ceil(q * scale - 1e-9) / scale)


def grouped(events: Iterable[RoundEvent]) -> Tuple[Tuple[float, float, int], ...]:
    """((q, z, count), ...): the rounds with q rounded up, equal ones counted together."""
    counts = Counter((round_q(e.q), e.noise_multiplier) for e in events)
    return tuple(sorted((q, z, n) for (q, z), n in counts.items()))


def dp_event(q: float, z: float, count: int = 1) -> Any:
    """The library's event for `count` rounds of a q-sampled Gaussian mechanism of multiplier z."""
    dpa = _library()
    if q == 0:
        inner = dpa.NoOpDpEvent()
    elif z == 0:
        inner = dpa.NonPrivateDpEvent()
    elif q >= 1:
        inner = dpa.GaussianDpEvent(z)
    else:
        inner = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z))
    return dpa.SelfComposedDpEvent(inner, count) if count != 1 else inner


def make_accountant(name: str) -> Any:
    """A fresh dp_accounting PrivacyAccountant: PLD (at PLD_DISCRETIZATION) or RDP."""
    if name not in ACCOUNTANTS:
        raise AccountingError(f"unknown accountant {name!r}; use one of {list(ACCOUNTANTS)}")
    dpa = _library()
    if name == "pld":
        return dpa.pld.pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    return dpa.rdp.rdp_privacy_accountant.RdpAccountant()


def check_delta(delta: float) -> float:
    if not 0 < delta < 1:
        raise AccountingError(f"the DP delta must lie in (0, 1), got {delta}")
    return delta


@contextlib.contextmanager
def _quiet_orders():
    """RDP warns (through absl) for each Renyi order whose series does not converge and leaves it out;
    the bound from the remaining orders is still an upper bound, so the warning is noise here."""
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


@functools.lru_cache(maxsize=256)
def _epsilon_of_groups(groups: Tuple[Tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    acc = make_accountant(accountant)
    with _quiet_orders():
        for q, z, count in groups:
            acc.compose(dp_event(q, z, count))
        eps = float(acc.get_epsilon(delta))
    return eps if eps >= 0 else 0.0


def epsilon(events: Sequence[RoundEvent], delta: float = DEFAULT_DELTA, accountant: str = "pld") -> float:
    """Epsilon at `delta` after all `events` (0 for none, inf if a round had no noise)."""
    check_delta(delta)
    make_accountant(accountant)  # an unknown name fails even with no events
    groups = tuple(g for g in grouped(events) if g[0] > 0)
    if not groups:
        return 0.0
    return _epsilon_of_groups(groups, float(delta), accountant)


def epsilon_sampling_known(participations: int, noise_multiplier: float, delta: float = DEFAULT_DELTA,
                           accountant: str = "pld") -> float:
    """Epsilon of a device that took part in `participations` rounds, against someone who knows which:
    those rounds composed without amplification (q = 1)."""
    if participations <= 0:
        return 0.0
    return epsilon([RoundEvent(1.0, noise_multiplier)] * participations, delta, accountant)


@dataclass(frozen=True)
class Decision:
    """May the next round run? The epsilon so far, and after the next round if it runs."""

    allowed: bool
    epsilon: float
    epsilon_next: float
    max_epsilon: Optional[float]

    @property
    def reason(self) -> str:
        if self.allowed:
            return (f"epsilon {self.epsilon:.4g} -> {self.epsilon_next:.4g} after the next round"
                    + (f", within the budget of {self.max_epsilon:g}" if self.max_epsilon is not None else ""))
        return (f"the next round would take epsilon from {self.epsilon:.4g} to {self.epsilon_next:.4g}, over the "
                f"budget of {self.max_epsilon:g} (--dp-max-epsilon)")


def next_round(events: Sequence[RoundEvent], planned: RoundEvent, max_epsilon: Optional[float],
               delta: float = DEFAULT_DELTA, accountant: str = "pld") -> Decision:
    """The stop-at-budget rule: the next round runs only if epsilon after it stays <= `max_epsilon`."""
    if max_epsilon is not None and not max_epsilon > 0:
        raise AccountingError(f"--dp-max-epsilon must be > 0, got {max_epsilon}")
    now = epsilon(events, delta, accountant)
    after = epsilon([*events, planned], delta, accountant)
    allowed = max_epsilon is None or after <= max_epsilon
    return Decision(allowed, now, after, max_epsilon)


def noise_for_epsilon(target_epsilon: float, rounds: int, q: float, delta: float = DEFAULT_DELTA,
                      accountant: str = "pld") -> float:
    """The smallest noise multiplier z (within 1e-3) for which `rounds` rounds at sampling q stay within
    `target_epsilon`: the library's calibration (Brent's method on epsilon).

    RDP's answer comes first (fast); as RDP's epsilon is never below PLD's, PLD's z lies under it, so
    PLD is searched between a quarter of it and it (tiny multipliers make PLDs huge and slow).
    """
    if not target_epsilon > 0 or rounds < 1 or not 0 < q <= 1:
        raise AccountingError(f"calibration needs epsilon > 0, rounds >= 1 and q in (0, 1]; got {target_epsilon}, "
                              f"{rounds}, {q}")
    check_delta(delta)
    charged = round_q(q)  # what `epsilon` will charge for these rounds

    dpa = _library()

    def calibrate(name: str, bracket) -> float:
        with _quiet_orders():
            return float(dpa.calibrate_dp_mechanism(
                lambda: make_accountant(name), lambda z: dp_event(charged, z, rounds), target_epsilon, delta,
                bracket_interval=bracket, tol=1e-3))

    upper = calibrate("rdp", dpa.LowerEndpointAndGuess(0.0, 1.0))
    if accountant == "rdp":
        return upper
    make_accountant(accountant)
    try:
        return calibrate(accountant, dpa.ExplicitBracketInterval(upper / 4, upper))
    except ValueError:  # PLD's z below upper/4: search from there down to zero
        return calibrate(accountant, dpa.ExplicitBracketInterval(1e-2, upper / 4))


MODES = ("central", "distributed")


@dataclass(frozen=True)
class DPSettings:
    """A DP federation's settings: the clip norm C, the noise multiplier z, delta, the budget, the accountant,
    and who adds the noise (central: the aggregator; distributed: the clients, under secure aggregation)."""

    clip: float
    noise_multiplier: float
    delta: float = DEFAULT_DELTA
    max_epsilon: Optional[float] = None
    accountant: str = "pld"
    mode: str = "central"

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise AccountingError(f"--dp-clip must be a finite number > 0, got {self.clip}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise AccountingError(f"--dp-noise-multiplier must be a finite number >= 0, got {self.noise_multiplier}")
        check_delta(self.delta)
        if self.max_epsilon is not None and not (self.max_epsilon > 0):
            raise AccountingError(f"--dp-max-epsilon must be > 0, got {self.max_epsilon}")
        if self.accountant not in ACCOUNTANTS:
            raise AccountingError(f"--dp-accountant must be one of {list(ACCOUNTANTS)}, got {self.accountant!r}")
        if self.mode not in MODES:
            raise AccountingError(f"--dp-mode must be one of {list(MODES)}, got {self.mode!r}")

    def to_json(self) -> dict:
        return {"clip": self.clip, "noise_multiplier": self.noise_multiplier, "delta": self.delta,
                "max_epsilon": self.max_epsilon, "accountant": self.accountant, "mode": self.mode}


class PrivacyLedger:
    """What a federation's rounds have cost so far, rebuilt from its history rows (their `dp` entries), so a
    restarted aggregator goes on counting where it stopped. Pure: the aggregator asks `plan` before it
    opens a round and `charge`s the round when it closes (failed rounds too: their noise was drawn).

    `plan` assumes the least noise the round can end with: in distributed mode only `min_reports` of the
    asked clients may add their share before the round closes on its quorum, so the check uses
    z * sqrt(min_reports / asked); the budget then holds whatever drops out.
    """

    def __init__(self, settings: DPSettings, rows: Iterable[dict] = ()) -> None:
        self.settings = settings
        self.events = []  # type: list
        self.participation = Counter()  # type: Counter
        for row in rows:
            dp = row.get("dp")
            if isinstance(dp, dict) and "q" in dp:
                self.events.append(RoundEvent(float(dp["q"]), float(dp["effective_noise_multiplier"])))
                self.participation.update([str(c) for c in row.get("reported", {})])

    @property
    def epsilon(self) -> float:
        s = self.settings
        return epsilon(self.events, s.delta, s.accountant)

    def plan(self, asked: int, population: int, min_reports: int = 1) -> Decision:
        s = self.settings
        z = s.noise_multiplier
        if s.mode == "distributed":
            z *= math.sqrt(min(max(min_reports, 1), asked) / asked)
        return next_round(self.events, RoundEvent.of_round(asked, population, z), s.max_epsilon, s.delta,
                          s.accountant)

    def charge(self, asked: int, population: int, effective_noise_multiplier: float,
               reported: Iterable[str]) -> dict:
        """Add a closed round; returns the accounting fields of its history row's `dp` entry."""
        s = self.settings
        event = RoundEvent.of_round(asked, population, effective_noise_multiplier)
        self.events.append(event)
        self.participation.update([str(c) for c in reported])  # each client once (a dict: its keys)
        most = max(self.participation.values(), default=0)
        return {"mode": s.mode, "clip": s.clip, "noise_multiplier": s.noise_multiplier,
                "q": event.q, "asked": asked, "population": population,
                "effective_noise_multiplier": effective_noise_multiplier, "epsilon": self.epsilon,
                "delta": s.delta, "accountant": s.accountant, "max_epsilon": s.max_epsilon,
                "most_rounds_of_one_device": most,
                "epsilon_sampling_known": epsilon_sampling_known(most, s.noise_multiplier if s.mode == "central"
                                                                 else min(e.noise_multiplier for e in self.events),
                                                                 s.delta, s.accountant)}
