"""TOML config files for the command-line tools: the same keys as the long options."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.8-3.10 devices
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file is unreadable or has keys the tool does not know."""


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


def merge_config(args: argparse.Namespace, parser: argparse.ArgumentParser, config: Dict[str, Any],
                 allowed: Iterable[str]) -> argparse.Namespace:
    """Fill options the command line left at their defaults from the config file.

    Precedence: command line, then config file, then the parser's defaults. Unknown keys are an error.
    """
    allowed = set(allowed)
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ConfigError(f"config file has unknown keys {unknown}; known keys: {sorted(allowed)}")
    merged = argparse.Namespace(**vars(args))
    for key, value in config.items():
        if getattr(args, key, None) == parser.get_default(key):
            setattr(merged, key, value)
    return merged
