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
            raise TrainerError(_no_backend_here(bundle))
        return usable[0]
    if backend not in usable:
        if not bundle.has(backend):
            raise TrainerError(f"backend {backend!r} cannot run bundle {bundle.root}: the bundle was not exported "
                               f"with it (it holds {', '.join(bundle.manifest.backends)}); export it with "
                               f"flora-export --backend {backend} or --backend all (the default)")
        raise TrainerError(f"backend {backend!r} cannot run here: it needs {TRAINERS[backend].requirement}, "
                           "which is not installed")
    return backend


def _no_backend_here(bundle: Bundle) -> str:
    """One line: what the bundle holds, why none of it trains here, and the export flag that fixes it."""
    held = list(bundle.manifest.backends)
    runs = [name for name, cls in TRAINERS.items() if cls.runs_here()]
    needs = "; ".join(f"{name} needs {TRAINERS[name].requirement}" for name in held if name in TRAINERS)
    if runs:
        return (f"bundle {bundle.root} holds only the {', '.join(held)} backend, which cannot train here ({needs}): "
                f"export it with flora-export --backend all (the default) or --backend {runs[0]}")
    every = "; ".join(f"{name} needs {cls.requirement}" for name, cls in TRAINERS.items())
    return f"no trainer backend runs here ({every}); bundle {bundle.root} holds {', '.join(held)}"


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
