"""Shared test helpers that are not fixtures: the repository root, the clip-tiny export, wheel installs,
image folders. Test modules import from here (and from tests.fakes), never from each other or from conftest."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
#: a proxy pre-trained for a few steps only (the `tiny_proxy` fixture): the code path of the real one, in seconds
TINY_PROXY = dict(steps=12, corpus=800, batch_size=64, warmup=4)

#: CLIP's normalisation (open_clip.OPENAI_DATASET_MEAN / _STD, checked in test_preprocess_open_clip.py).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def export_tiny(out, tower: str = "text", backends=("ort-training",), **overrides):
    """Export a clip-tiny bundle (random-init, seed 0) into `out` and return the loaded Bundle (needs torch)."""
    from flora.edge.bundle import load_bundle
    from flora.export.pipeline import ExportOptions, export_bundle

    opts = ExportOptions(preset="clip-tiny", classes=list(DIGITS), out=out, tower=tower,
                         backends=tuple(backends), **overrides)
    export_bundle(opts, say=lambda _msg: None)
    return load_bundle(out)


#: What a checkout holds that is not the project's (never in a dist; not copied to build from).
NOT_SOURCES = {".git", ".venv", "build", "dist", "bundles", "runs", ".pytest_cache", ".ruff_cache", "__pycache__"}


def source_files(root: Path = REPO) -> List[str]:
    """The project's files, relative to `root`: git's tracked files in a checkout, else (an unpacked sdist)
    every file outside NOT_SOURCES and the build's own egg-info."""
    proc = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, text=True)
    if proc.returncode == 0 and proc.stdout:
        return sorted(name for name in proc.stdout.split("\0") if name and (root / name).is_file())
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                  and not NOT_SOURCES & set(p.relative_to(root).parts) and ".egg-info" not in str(p.parent))


def copy_sources(dest: Path) -> Path:
    """A clean copy of the project's files (builds write egg-info and build/ next to the sources)."""
    for name in source_files():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    return dest


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


# -- hostile payloads (tests/test_wire.py, tests/test_hostile.py) ---------------------------------------
def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def header_blob(header_json: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header_json)) + header_json + data


#: The shapes that crashed processes before this layer existed, and their neighbours.
ADVERSARIAL: List[bytes] = [
    nested(1000).encode(),                         # RecursionError inside json.loads (2 KB)
    nested(100_000).encode(),                      # far deeper
    ('{"a":' * 5000 + "1" + "}" * 5000).encode(),  # deep objects
    nested(10, '"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["').encode(),  # brackets inside a string are not nesting
    b'{"round": 1e400}', b'{"round": -1e400}', b'{"round": Infinity}', b'{"round": NaN}', b'{"round": -Infinity}',
    b'{"round": ' + b"9" * 5000 + b"}",             # int() of 5,000 digits: ValueError in 3.11, slow before
    b'{"round": 1, "round": 2}',                   # duplicate keys: parsers disagree on which wins
    b'{"round": "\\ud800"}',                        # a lone surrogate: UnicodeEncodeError when written out
    b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"\x00" * 16, b"", b"null", b"[]", b"1", b'"x"', b"{",
    b'{"' + b"k" * 100_000 + b'": 1}',
    json.dumps({"clients": ["c"] * 200_000}).encode(),
    json.dumps({"x": "y" * (9 << 20)}).encode(),   # over every message's size limit
]


def adversarial_headers() -> List[bytes]:
    """Safetensors blobs whose JSON header is each adversarial payload (the aggregator's crash loop)."""
    return [header_blob(p) for p in ADVERSARIAL] + [
        header_blob(json.dumps({"t": {"dtype": "F32", "shape": [10 ** 30], "data_offsets": [0, 4]}}).encode()),
        header_blob(json.dumps({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}).encode()),
        header_blob(json.dumps({"t": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}).encode(), b"\0" * 4),
        header_blob(json.dumps({"t": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}).encode(), b"\0" * 4),
        header_blob(json.dumps({"__metadata__": {"num_samples": "9" * 5000}}).encode()),
        header_blob(json.dumps({"__metadata__": {"a": 1}}).encode()),
        header_blob(json.dumps({"__metadata__": "x"}).encode()),
        header_blob(b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}}', b"\0" * 4),
        struct.pack("<Q", 2 ** 64 - 1) + b"{}",
    ]


#: the learning rate of the backend comparisons
LR = 5e-3


def run_backend(bundle, backend: str, data, weight_decay: float = 0.0, lr: float = LR):
    """Train a bundle with one backend over `data` batches; (final adapter, losses)."""
    from flora.edge.trainers import open_trainer

    trainer = open_trainer(bundle, backend)
    trainer.set_lr(lr)
    trainer.set_weight_decay(weight_decay)
    losses = [trainer.train_step(x, y).loss for x, y in data]
    return trainer.get_adapter(), np.array(losses)


def assert_same_adapter(a, b, rtol=1e-3, atol=1e-5, max_outside=0.0, outside_bound=None):
    """All elements within rtol/atol, or (for deep towers) all but a fraction `max_outside`,
    which must still lie within `outside_bound`."""
    assert set(a) == set(b)
    if max_outside == 0.0:
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=name)
        return
    x = np.concatenate([a[n].ravel() for n in sorted(a)])
    y = np.concatenate([b[n].ravel() for n in sorted(a)])
    outside = np.abs(x - y) > atol + rtol * np.abs(y)
    assert outside.mean() <= max_outside, f"{outside.sum()} of {outside.size} elements differ"
    assert np.abs(x - y).max() <= outside_bound


def _rgb(rng, w, h):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth(rng, w, h):
    """A smooth colour image (realistic for JPEG and palette quantisation), plus noise."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(w + h - 2, 1)], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def write_preprocess_images(folder: Path) -> Dict[str, Path]:
    """Real files of odd sizes and modes, as a device would find them (PREPROCESS_IMAGES): name -> path."""
    rng = np.random.default_rng(0)
    imgs = {
        "rgb_37x211.jpg": Image.fromarray(_smooth(rng, 37, 211)),
        "rgb_640x479.png": Image.fromarray(_rgb(rng, 640, 479)),
        "rgb_23x23_smaller_than_crop.png": Image.fromarray(_rgb(rng, 23, 23)),
        "rgb_224x224_exact.png": Image.fromarray(_rgb(rng, 224, 224)),
        "rgb_32x32_exact.bmp": Image.fromarray(_rgb(rng, 32, 32)),
        "gray_L_300x200.png": Image.fromarray(rng.integers(0, 256, (200, 300), dtype=np.uint8)),
        "gray_LA_51x77.png": Image.fromarray(rng.integers(0, 256, (77, 51, 2), dtype=np.uint8), "LA"),
        "cmyk_90x60.jpg": Image.fromarray(_smooth(rng, 90, 60)).convert("CMYK"),
        "palette_P_120x80.png": Image.fromarray(_smooth(rng, 120, 80)).quantize(64),
        "palette_P_65x49.gif": Image.fromarray(_smooth(rng, 65, 49)).quantize(32),
        "bilevel_1_45x70.tif": Image.fromarray(rng.integers(0, 2, (70, 45), dtype=np.uint8) * 255).convert("1"),
        "rgb_100x75.webp": Image.fromarray(_smooth(rng, 100, 75)),
    }
    # RGBA: random colours, a fully transparent band, a half-transparent band and an opaque rest
    rgba = np.concatenate([_rgb(rng, 90, 150), np.full((150, 90, 1), 255, np.uint8)], axis=2)
    rgba[:50, :, 3] = 0
    rgba[50:100, :, 3] = rng.integers(0, 256, (50, 90), dtype=np.uint8)
    imgs["rgba_90x150.png"] = Image.fromarray(rgba, "RGBA")
    paths = {}
    for name, img in imgs.items():
        paths[name] = folder / name
        img.save(paths[name], **({"quality": 90} if name.endswith(".jpg") else {}))
    # a phone photo stored sideways: 160x100 pixels, EXIF Orientation 6 (rotate 90° clockwise to show)
    sideways = Image.fromarray(_smooth(rng, 160, 100))
    exif = sideways.getexif()
    exif[0x0112] = 6
    paths["exif_orientation6_160x100.jpg"] = folder / "exif_orientation6_160x100.jpg"
    sideways.save(paths["exif_orientation6_160x100.jpg"], exif=exif, quality=90)
    # 16-bit grayscale PNG over the full 0..65535 range
    paths["gray16_I;16_70x50.png"] = folder / "gray16_I;16_70x50.png"
    Image.fromarray(rng.integers(0, 65536, (50, 70)).astype(np.uint16)).save(paths["gray16_I;16_70x50.png"])
    return paths



PREPROCESS_IMAGES = sorted([
    "rgb_37x211.jpg", "rgb_640x479.png", "rgb_23x23_smaller_than_crop.png", "rgb_224x224_exact.png",
    "rgb_32x32_exact.bmp", "gray_L_300x200.png", "gray_LA_51x77.png", "cmyk_90x60.jpg", "palette_P_120x80.png",
    "palette_P_65x49.gif", "bilevel_1_45x70.tif", "rgb_100x75.webp", "rgba_90x150.png",
    "exif_orientation6_160x100.jpg", "gray16_I;16_70x50.png",
])


#: Runs pytest with some top-level modules made unimportable: argv[1] is their comma-separated names, the rest
#: pytest's arguments. Prints what was tried or loaded anyway; exit status 99 when anything was.
BLOCKING_RUNNER = textwrap.dedent(
    """
    import importlib.abc, sys
    blocked = tuple(sys.argv[1].split(","))
    tried = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                tried.append(name)
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    import pytest
    code = pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[2:]])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in blocked)
    print("BLOCKED-TRIED", tried, "LOADED", loaded)
    sys.exit(code if not (tried or loaded) else 99)
    """
)


def run_pytest_blocking(blocked: Sequence[str], *pytest_args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """pytest on `pytest_args` in a fresh process in which importing any module of the `blocked` top-level
    packages raises ImportError; exit status 99 if one was tried or is loaded, even when the tests passed."""
    return subprocess.run([sys.executable, "-c", BLOCKING_RUNNER, ",".join(blocked), *pytest_args],
                          capture_output=True, text=True, timeout=600, cwd=cwd)
