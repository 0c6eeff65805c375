"""The errors the flora tools report as one line and an exit status instead of a traceback.

`FloraError` is the base: a command-line tool catches it (and nothing broader), prints
`<tool>: error: <message>` and exits with the error's `exit_code`; any other exception is a bug and
shows its traceback. Each error class sets the status it means. flora-agent and flora-aggregator
document these statuses (flora-sim exits 1 for every error):
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, TextIO

#: bad arguments, config values or inputs (a bundle, a data set, an adapter that does not fit); the
#: systemd unit does not restart the agent on it: a restart cannot fix it
EXIT_BAD_INPUT = 2
#: the broker or the aggregator's state dir failed (unreachable, refused, locked, unreadable, disk full)
EXIT_UNAVAILABLE = 3
#: flora-aggregator: a round stayed below quorum through --max-extensions extensions
EXIT_QUORUM = 4


class FloraError(Exception):
    """An error the user can act on; `exit_code` is the status the tools exit with for it."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(FloraError, ValueError):
    """An option or config-file value is unusable (wrong type, out of range, unknown key, unreadable file)."""


def report(prog: str, exc: BaseException, code: Optional[int] = None, stream: Optional[TextIO] = None) -> int:
    """Print `<prog>: error: <exc>` to stderr; returns `code`, else the FloraError's `exit_code` (else 2)."""
    print(f"{prog}: error: {exc}", file=stream or sys.stderr)
    if code is not None:
        return code
    return exc.exit_code if isinstance(exc, FloraError) else EXIT_BAD_INPUT


def run_console_script(tool: str, extra: str, module: str) -> int:
    """A console script: `module`.main(), or, where a package it needs is not installed, one line naming
    the extra that installs it (exit 2) instead of a ModuleNotFoundError traceback."""
    try:
        return importlib.import_module(module).main()
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if not missing or missing == "flora":  # a module of this project: a broken install or a bug
            raise
        print(f"{tool}: error: the Python module {missing!r} is not installed; {tool} needs the {extra!r} "
              f"extra: pip install 'flora-edge[{extra}]'", file=sys.stderr)
        return EXIT_BAD_INPUT
