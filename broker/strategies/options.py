"""Strategy options: `--strategy-option KEY=VALUE` on the command line, a table in the config file.

Each strategy class declares the options it takes (`options`, name -> `Option`); `make_strategy`
parses what the user gave against that list, so a typo or a bad value is an error naming the
strategy's known options, never a silent default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

from flora.edge.errors import ConfigError


class OptionError(ConfigError):
    """A strategy option is unknown or its value cannot be used."""


@dataclass(frozen=True)
class Option:
    """One option: how to read its value (from a string or a config value), its default, what it does."""

    parse: Callable[[Any], Any]
    default: Any
    help: str


def parse_assignments(items: Optional[Iterable[str]]) -> Dict[str, str]:
    """["trim=0.2", "max_updates=500"] -> {"trim": "0.2", "max_updates": "500"}; a key given twice is an error."""
    out: Dict[str, str] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise OptionError(f"strategy option {item!r} must read KEY=VALUE")
        if key in out:
            raise OptionError(f"strategy option {key!r} is given twice")
        out[key] = value.strip()
    return out


def resolve(strategy: str, declared: Mapping[str, Option], given: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The keyword arguments of a strategy: every declared option, parsed from `given` or its default."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(declared))
    if unknown:
        known = ", ".join(f"{k} ({o.help})" for k, o in sorted(declared.items())) or "none"
        raise OptionError(f"strategy {strategy!r} has no option {', '.join(map(repr, unknown))}; its options: {known}")
    values = {}
    for key, option in declared.items():
        if key not in given:
            values[key] = option.default
            continue
        try:
            values[key] = option.parse(given[key])
        except (TypeError, ValueError) as exc:
            raise OptionError(f"strategy {strategy!r} option {key}={given[key]!r}: {exc}") from None
    return values


# -- parsers -------------------------------------------------------------------------------------
def positive_float(value: Any) -> float:
    x = float(value)
    if not (x > 0 and math.isfinite(x)):
        raise ValueError("must be a finite number > 0")
    return x


def fraction_below_half(value: Any) -> float:
    x = float(value)
    if not 0 <= x < 0.5:
        raise ValueError("must be in [0, 0.5): the fraction trimmed from each end")
    return x


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("must be a positive integer")
    x = int(value)
    if x < 1:
        raise ValueError("must be a positive integer")
    return x


def choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value)
        if text not in allowed:
            raise ValueError(f"must be one of {list(allowed)}")
        return text

    return parse


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError("must be true or false")


def unit_interval(value: Any) -> float:
    x = float(value)
    if not 0 <= x < 1:
        raise ValueError("must be in [0, 1)")
    return x
