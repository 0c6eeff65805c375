"""Which trainer backends run here, and opening a bundle and its trainer (the agent, the doctor, the
simulator and the benchmarks all go through here)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

from ..bundle import Bundle, BundleError, load_bundle
from .base import Trainer, TrainerError
from .ort_training import OrtTrainingTrainer
from .step import StepTrainer

log = logging.getLogger(__name__)

#: Every backend by name, preferred first (`auto` takes the first that runs here and is in the bundle).
TRAINERS: Dict[str, Type[Trainer]] = {cls.name: cls for cls in (OrtTrainingTrainer, StepTrainer)}
AUTO = "auto"


def available_backends(bundle: Bundle) -> List[str]:
    """Backends that both this machine and this bundle support, preferred first."""
    return [name for name, cls in TRAINERS.items() if bundle.has(name) and cls.runs_here()]


def choose_backend(bundle: Bundle, backend: str = AUTO) -> str:
    """`backend`, or for `auto` the preferred backend that runs `bundle` here; TrainerError if it cannot run."""
    if backend != AUTO and backend not in TRAINERS:
        raise TrainerError(f"unknown trainer backend {backend!r}; use {', '.join([AUTO, *TRAINERS])}")
    usable = available_backends(bundle)
    if backend == AUTO:
        if not usable:
            needs = "; ".join(f"{name} needs {cls.requirement}" for name, cls in TRAINERS.items())
            raise TrainerError(
                f"no trainer backend can run bundle {bundle.root} here: it holds {list(bundle.manifest.backends)}; "
                f"{needs}, and a bundle exported with it (--backend all has both)"
            )
        return usable[0]
    if backend not in usable:
        why = ("the bundle was not exported with it" if not bundle.has(backend)
               else f"it needs {TRAINERS[backend].requirement}, which is not installed")
        raise TrainerError(f"backend {backend!r} cannot run here: {why}")
    return backend


def open_trainer(
    bundle: Bundle,
    backend: str = AUTO,
    *,
    threads: Optional[int] = None,
    providers: Optional[Sequence[str]] = None,
) -> Trainer:
    """A trainer for `bundle`: `backend`, or for `auto` ort-training where it runs and the bundle has it, else step."""
    name = choose_backend(bundle, backend)
    try:
        return TRAINERS[name](bundle, threads=threads, providers=providers)
    except (BundleError, TrainerError):
        raise
    except Exception as exc:  # the runtime refused the bundle's graphs: say which backend
        raise TrainerError(f"cannot start the {name} trainer: {exc}") from exc


def open_bundle(path: Union[str, Path], backend: str = AUTO) -> Tuple[Bundle, str]:
    """The bundle at `path` with the files of the backend that will train it verified, and that backend.

    For `auto` that is the preferred backend usable here; where none is, every file is verified and
    `auto` is returned (`open_trainer` then says why no trainer can start).
    """
    if backend != AUTO and backend not in TRAINERS:
        raise TrainerError(f"unknown trainer backend {backend!r}; use {', '.join([AUTO, *TRAINERS])}")
    if backend == AUTO:
        usable = available_backends(load_bundle(path, verify=False))
        backend = usable[0] if usable else AUTO
    bundle = load_bundle(path, backends=None if backend == AUTO else [backend])
    return bundle, backend
