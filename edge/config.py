"""Command-line options and the TOML config files that mirror them, for every flora tool.

Declare options with plain argparse calls on a `CommandParser` (sub-parsers and argument groups
included); everything else is derived from those declarations:

- a config file (`--config FILE`, `add_config_option`) takes the long options' names as keys
  (`round_timeout = 600` or `round-timeout = 600`), checked against the option's type and choices:
  `config key threads must be an integer, got 'four'`; a key no option has is an error;
- precedence: the command line (even a value equal to the default), then the config file, then the
  parser's defaults (`apply_config`);
- `--version` (`add_version_option`) and a default sub-command that also answers `--help`
  (`with_default_command`).

A new option is one `add_argument` call: its config key, type check and precedence come with it.
"""

from __future__ import annotations

import argparse
import operator
import sys
from pathlib import Path, PurePath
from typing import Any, Collection, Dict, List, Optional, Sequence, Set

from . import __version__
from .errors import ConfigError

__all__ = [
    "CONFIG_DEST", "Bounded", "CommandParser", "ConfigError", "add_config_option", "add_version_option", "apply_config",
    "comma_list", "config_keys", "config_value", "explicit_options", "load_toml", "with_default_command",
]

#: The dest of `--config`: the one option a config file cannot set.
CONFIG_DEST = "config"


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser that records the options declared on it and on its argument groups.

    `options` maps each option's dest to its argparse Action, in declaration order (help and
    --version, whose default is SUPPRESS, are not options); `commands` maps a sub-command's name to
    its parser once `add_subparsers` was called (sub-parsers are CommandParsers too).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.options: Dict[str, argparse.Action] = {}  # before super().__init__, which adds -h
        self.commands: Dict[str, CommandParser] = {}
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        return self.record(super().add_argument(*args, **kwargs))

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
        return _RecordingGroup(self, super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, **kwargs: Any) -> Any:
        return _RecordingGroup(self, super().add_mutually_exclusive_group(**kwargs))

    def add_subparsers(self, **kwargs: Any) -> Any:
        action = super().add_subparsers(**kwargs)
        self.commands = action.choices  # the Action's own name -> parser map, filled by add_parser
        return action

    def record(self, action: argparse.Action) -> argparse.Action:
        """Note `action` as an option (what `add_argument` returned); returns it."""
        if action.default is not argparse.SUPPRESS:
            self.options[action.dest] = action
        return action


class _RecordingGroup:
    """An argument group whose options are recorded in its parser's `options`."""

    def __init__(self, parser: CommandParser, group: Any) -> None:
        self._parser = parser
        self._group = group

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        return self._parser.record(self._group.add_argument(*args, **kwargs))

    def add_argument_group(self, *args: Any, **kwargs: Any) -> _RecordingGroup:
        return _RecordingGroup(self._parser, self._group.add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, **kwargs: Any) -> _RecordingGroup:
        return _RecordingGroup(self._parser, self._group.add_mutually_exclusive_group(**kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._group, name)


class CommaList:
    """An option type: "cuda,cpu" on the command line, "cuda,cpu" or ["cuda", "cpu"] in a config file."""

    __name__ = "comma-separated list"

    def __call__(self, text: str) -> List[str]:
        return [part.strip() for part in text.split(",") if part.strip()]


comma_list = CommaList()


_COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


class Bounded:
    """An option type: an int or a float within bounds, e.g. `Bounded(int, minimum=1)` or
    `Bounded(float, minimum=0.0, below=1.0)`; config values get the same check."""

    def __init__(self, kind: type, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
                 above: Optional[float] = None, below: Optional[float] = None) -> None:
        if kind not in (int, float):
            raise TypeError(f"Bounded takes int or float, not {kind!r}")
        self.kind = kind
        self.limits = [(op, bound) for op, bound in ((">=", minimum), ("<=", maximum), (">", above), ("<", below))
                       if bound is not None]
        self.__name__ = kind.__name__

    def __call__(self, text: str) -> Any:
        return self.check(self.kind(text))

    def check(self, value: Any) -> Any:
        """`value` if it lies within the bounds, else argparse.ArgumentTypeError saying what they are."""
        for op, bound in self.limits:
            if not _COMPARE[op](value, bound):
                raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {value}")
        return value

    def describe(self) -> str:
        return " and ".join(f"{op} {bound:g}" for op, bound in self.limits) or "a number"


def add_config_option(parser: CommandParser, what: str = "these options") -> argparse.Action:
    return parser.add_argument("--config", type=Path, metavar="FILE",
                               help=f"TOML file with the same keys as {what} (the command line wins over it)")


def add_version_option(parser: argparse.ArgumentParser) -> argparse.Action:
    return parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def with_default_command(argv: Sequence[str], parser: CommandParser, default: str) -> List[str]:
    """`argv` with `default` put first unless it names a sub-command or asks for --version, so
    `tool --help` shows the default command's options."""
    argv = list(argv)
    if argv and (argv[0] in parser.commands or argv[0] == "--version"):
        return argv
    return [default, *argv]


def load_toml(path: Optional[PurePath]) -> Dict[str, Any]:
    """The config file's keys (dashes read as underscores) and values; {} without a file."""
    if path is None:
        return {}
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.8-3.10 devices: tomli, in the edge and broker extras
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return {k.replace("-", "_"): v for k, v in data.items()}


def config_keys(parser: CommandParser) -> List[str]:
    """The keys a config file may set for `parser`: every option but --config."""
    return [dest for dest in parser.options if dest != CONFIG_DEST]


_UNSET = object()


def explicit_options(parser: CommandParser, argv: Sequence[str]) -> Set[str]:
    """The options (dests) that `argv` gives explicitly, whatever their value.

    Parses `argv` once more into a namespace where every option is pre-set to a marker: argparse
    only fills in a default where the namespace has no value, so what is no longer the marker was
    given on the command line. Options that collect values (append, extend) start from None instead,
    as argparse extends what the namespace holds.
    """
    collecting = {dest for dest, action in parser.options.items() if isinstance(action, argparse._AppendAction)}
    namespace = argparse.Namespace(**{dest: None if dest in collecting else _UNSET for dest in parser.options})
    parser.parse_known_args(list(argv), namespace)
    return {dest for dest in parser.options
            if getattr(namespace, dest, _UNSET) is not (None if dest in collecting else _UNSET)}


def apply_config(parser: CommandParser, args: argparse.Namespace, argv: Sequence[str], config: Dict[str, Any],
                 ignore: Collection[str] = ()) -> argparse.Namespace:
    """`args` (parsed from `argv` by `parser`) with what the command line did not give taken from `config`.

    Every key must be one of `parser`'s options (or in `ignore`: keys of a file shared with another
    command, skipped); values are checked and converted as the option would convert them.
    """
    allowed = config_keys(parser)
    unknown = sorted(set(config) - set(allowed) - set(ignore))
    if unknown:
        raise ConfigError(f"config file has unknown keys {unknown}; known keys: {sorted(allowed)}")
    given = explicit_options(parser, argv)
    merged = argparse.Namespace(**vars(args))
    for key, value in config.items():
        if key in parser.options and key not in given:
            setattr(merged, key, config_value(parser.options[key], key, value))
    return merged


def config_value(action: argparse.Action, key: str, value: Any) -> Any:
    """A config file's `value` for option `action`, as the command line would have given it, or ConfigError."""
    if action.nargs == 0:  # a flag (store_true, store_false, store_const)
        if isinstance(action.const, bool) and not isinstance(value, bool):
            raise ConfigError(f"config key {key} must be true or false, got {value!r}")
        return value
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        if not isinstance(value, list):
            raise ConfigError(f"config key {key} must be a list, got {value!r}")
        return [_checked(action, key, item) for item in value]
    return _checked(action, key, value)


def _checked(action: argparse.Action, key: str, value: Any) -> Any:
    converted = _converted(action.type, key, value)
    if action.choices is not None and converted not in action.choices:
        raise ConfigError(f"config key {key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return converted


def _converted(kind: Any, key: str, value: Any) -> Any:
    if isinstance(kind, CommaList) and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if kind in (None, str):
        _expect(isinstance(value, str), key, value, "a string")
        return value
    if isinstance(kind, Bounded):
        try:
            return kind.check(_converted(kind.kind, key, value))
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"config key {key} {exc}") from None
    if kind is int:
        _expect(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
        return value
    if kind is float:
        _expect(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "a number")
        return float(value)
    if isinstance(kind, type) and issubclass(kind, PurePath):
        _expect(isinstance(value, str), key, value, "a path (a string)")
        return kind(value)
    # any other type parses the option's text: give it the config file's text
    _expect(isinstance(value, str), key, value,
            "a list of strings or a comma-separated string" if isinstance(kind, CommaList) else "a string")
    try:
        return kind(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"config key {key}: {exc}") from exc


def _expect(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key} must be {what}, got {value!r}")
