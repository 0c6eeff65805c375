"""TOML config files for the command-line tools: the same keys as the long options."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Collection, Dict, Iterable, Optional, Sequence, Set

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.8-3.10 devices
    import tomli as tomllib

__all__ = ["ConfigError", "explicit_options", "load_toml", "merge_config"]


def load_toml(path: Optional[Path]) -> Dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return {k.replace("-", "_"): v for k, v in data.items()}


_UNSET = object()


def explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Set[str]:
    """The option names (dests) that `argv` sets explicitly, whatever their value, for `parser`.

    Parses `argv` once more into a namespace where every option is pre-set to a marker: argparse
    only fills in a default where the namespace has no value, so what is no longer the marker was
    given on the command line.
    """
    dests = {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS}
    namespace = argparse.Namespace(**{d: _UNSET for d in dests})
    parser.parse_known_args(list(argv), namespace)
    return {d for d in dests if getattr(namespace, d, _UNSET) is not _UNSET}


def merge_config(args: argparse.Namespace, parser: argparse.ArgumentParser, config: Dict[str, Any],
                 allowed: Iterable[str], explicit: Optional[Collection[str]] = None) -> argparse.Namespace:
    """Fill the options the command line did not give from the config file.

    Precedence: command line, then config file, then the parser's defaults. Unknown keys are an error.
    `explicit` names the options given on the command line (`explicit_options`); they always win,
    even with a value that equals the default. Without it, an option still at its parser default
    counts as not given (the older rule, which cannot tell `--seed 0` from no `--seed`).
    """
    allowed = set(allowed)
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ConfigError(f"config file has unknown keys {unknown}; known keys: {sorted(allowed)}")
    merged = argparse.Namespace(**vars(args))
    for key, value in config.items():
        given = key in explicit if explicit is not None else getattr(args, key, None) != parser.get_default(key)
        if not given:
            setattr(merged, key, value)
    return merged
