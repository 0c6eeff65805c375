"""Child processes of a simulation (aggregator, agents), with logs and a teardown that always runs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .signals import signals_deferred


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ProcessGroup:
    """Starts console-script modules as real processes; `stop()` ends every one of them."""

    log_dir: Path
    children: List[Child] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)

    def start(self, name: str, module: str, args: Sequence[str]) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with signals_deferred(), open(log_path, "wb") as log:  # known to stop() before any signal unwinds
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # Ctrl-C in the terminal reaches us; we stop the children ourselves
            )
            child = Child(name, proc, log_path)
            self.children.append(child)
        return child

    def failed(self) -> List[Child]:
        return [c for c in self.children if c.process.poll() not in (None, 0)]

    def wait(self, children: Sequence[Child], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for child in children:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                child.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                return False
        return True

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every live child (its whole process group), then SIGKILL what is left after `grace`."""
        live = [c for c in self.children if c.alive()]
        for child in live:
            _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in live:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child.process, signal.SIGKILL)
                child.process.wait(timeout=5)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def describe_failure(child: Child) -> Optional[str]:
    code = child.process.poll()
    if code in (None, 0):
        return None
    return f"{child.name} exited with code {code}; last lines of {child.log_path}:\n{child.log_tail()}"
