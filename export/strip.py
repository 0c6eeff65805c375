"""`flora-export strip --backend step BUNDLE OUT`: a copy of a bundle with only what one kind of device uses.

A Raspberry Pi or Jetson runs the `step` backend and never reads the ONNX Runtime training
artifacts; an x86-64 device with onnxruntime-training never reads train_step.onnx. The copy keeps
the inference files (the inference model, the image encoder and its int8 version, the initial
adapter), the chosen backends' files, and a shared weights file compacted to the tensors those
graphs still read. Its manifest is fresh (files, hashes, backends, external data) with the same
model_id: adapters and federations are unaffected.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

from flora.edge import bundle as B
from flora.edge.errors import FloraError
from flora.edge.fileio import atomic_write_bytes, current_umask, sha256_file

from .shared_data import share_weights


class StripError(FloraError, RuntimeError):
    """The bundle cannot be stripped as asked."""


def kept_files(manifest: B.Manifest, backends: Sequence[str]) -> List[str]:
    """The graphs and files (without external data) a bundle for `backends` keeps."""
    files = B.required_files(manifest.input_kind, backends)
    if B.IMAGE_ENCODER_INT8 in manifest.files:
        files.append(B.IMAGE_ENCODER_INT8)
    return files


def strip_bundle(src: Path, out: Path, backends: Sequence[str], force: bool = False,
                 say: Callable[[str], None] = print) -> B.Manifest:
    """Write the stripped copy of `src` to `out` (atomically); returns its manifest."""
    from .pipeline import _replace_dir, check_output, make_folders, remove_empty_folders

    backends = tuple(dict.fromkeys(backends))
    bundle = B.load_bundle(src)
    m = bundle.manifest
    missing = [b for b in backends if b not in m.backends]
    if missing or not backends:
        raise StripError(f"{src} holds backends {list(m.backends)}; it cannot keep {missing or 'no backend'}")
    if Path(out).resolve() == Path(src).resolve():
        raise StripError("OUT must be another folder than BUNDLE")
    check_output(out, force)
    created: List[Path] = []
    make_folders(out.parent, created)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        manifest = _write_stripped(bundle, tmp, backends)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty_folders(created)
        raise
    before, after = _size(src, m.files), _size(out, manifest.files)
    say(f"wrote {out}: backends {', '.join(backends)}, {after / 2**20:.1f} MiB (from {before / 2**20:.1f} MiB)")
    return manifest


def _write_stripped(bundle: B.Bundle, tmp: Path, backends: Sequence[str]) -> B.Manifest:
    from .pipeline import external_data_of

    m = bundle.manifest
    files = kept_files(m, backends)
    graphs = [f for f in files if f in m.external_data]
    data = sorted({d for g in graphs for d in m.external_data[g]})
    for name in [*files, *data, B.MANIFEST]:
        shutil.copy2(bundle.path(name), tmp / name)
    if graphs:
        share_weights(tmp, graphs)  # compacts the shared file to the tensors these graphs read
    external = external_data_of(tmp, files)
    listed = sorted({*files, *(d for names in external.values() for d in names)})
    for stale in {p.name for p in tmp.iterdir()} - {*listed, B.MANIFEST}:
        (tmp / stale).unlink()
    onnx_facts = dict(m.onnx)
    if "shared_data" in onnx_facts:
        onnx_facts["shared_data"] = dict(onnx_facts["shared_data"], graphs=graphs)
    manifest = dataclasses.replace(
        m, backends=tuple(backends), files={name: sha256_file(tmp / name) for name in listed},
        external_data=external, onnx=onnx_facts,
        created=dict(m.created, stripped={"by": "flora-export strip", "backends": list(backends),
                                          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}),
    )
    atomic_write_bytes(tmp / B.MANIFEST, manifest.to_json().encode())
    B.load_bundle(tmp)  # re-read and verify what was written
    return manifest


def _size(folder: Path, files: Dict[str, str]) -> int:
    return sum((Path(folder) / name).stat().st_size for name in files) + (Path(folder) / B.MANIFEST).stat().st_size
