"""Shared test helpers that are not fixtures: the repository root, the clip-tiny export, wheel installs,
image folders. Test modules import from here (and from tests.fakes), never from each other or from conftest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def export_tiny(out, tower: str = "text", backends=("ort-training",), **overrides):
    """Export a clip-tiny bundle (random-init, seed 0) into `out` and return the loaded Bundle (needs torch)."""
    from flora.edge.bundle import load_bundle
    from flora.export.pipeline import ExportOptions, export_bundle

    opts = ExportOptions(preset="clip-tiny", classes=list(DIGITS), out=out, tower=tower,
                         backends=tuple(backends), **overrides)
    export_bundle(opts, say=lambda _msg: None)
    return load_bundle(out)


def install_wheel(wheel: Path, site: Path) -> None:
    """Install the project's wheel alone (no dependencies) into the folder `site`."""
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--upgrade",
                           "--disable-pip-version-check", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def class_folders(root: Path, counts: Dict[str, int], seed: int = 0) -> Path:
    """PNG images of random content (so each has its own hash), one folder per class."""
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels, mode="RGB").save(root / name / f"{i:02d}.png")
    return root


def gray_pngs(folder: Path, n: int) -> List[Path]:
    """`n` 8x8 grayscale PNGs of random content (seeded) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(p)
        paths.append(p)
    return paths


def batches(dim: int, steps: int = 20, n: int = 16, seed: int = 0, distinct: int = 4):
    """A learnable task: labels of a random linear teacher on random features, `distinct` batches cycled."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((dim, 10))
    pool = []
    for _ in range(distinct):
        x = rng.standard_normal((n, dim)).astype(np.float32)
        pool.append((x, (x @ teacher).argmax(axis=1).astype(np.int64)))
    return [pool[i % distinct] for i in range(steps)]
