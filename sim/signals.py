"""Signals during a simulation: SIGTERM and SIGHUP end it like Ctrl-C, and no step that must finish is cut short.

The children run in their own sessions (a terminal's Ctrl-C reaches only flora-sim), so flora-sim
itself must stop them on every way out: `terminate_as_interrupt` turns SIGTERM/SIGHUP into the
same `KeyboardInterrupt` unwinding as Ctrl-C, and `signals_deferred` holds signals while a child
is being started (so it is known before anything can unwind) and while the children are stopped.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Dict, Iterator, List

TERMINATING = (signal.SIGTERM, signal.SIGHUP)
HELD = (signal.SIGINT, *TERMINATING)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived; a KeyboardInterrupt, so the teardown that Ctrl-C runs runs too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _install(signums, handler) -> Dict[int, object]:
    """Set `handler` for each signal; return the previous handlers."""
    return {s: signal.signal(s, handler) for s in signums}


def _restore(previous: Dict[int, object]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM and SIGHUP raise `Terminated` (main thread only; elsewhere a no-op)."""
    if not _in_main_thread():
        yield
        return
    previous = _install(TERMINATING, _raise_terminated)
    try:
        yield
    finally:
        _restore(previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block is done, then deliver the first one that came.

    The block always runs to its end: a second Ctrl-C during teardown cannot skip stopping the broker.
    """
    if not _in_main_thread():
        yield
        return
    pending: List[int] = []
    previous = _install(HELD, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        _restore(previous)
        if pending:
            signal.raise_signal(pending[0])
