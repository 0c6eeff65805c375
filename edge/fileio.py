"""Crash-safe file writes and content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

_CHUNK = 1 << 20


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


#: fsync a directory, so that the names created or renamed in it are durable.
fsync_dir = _fsync_dir


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: PathLike, data: bytes, mode: Optional[int] = None) -> None:
    """Write `data` to `path` so that a reader sees either the old or the new file, never a part.

    The bytes go to a temporary file in the same directory, are fsynced, then renamed over `path`.
    The file gets `mode`, or the usual permissions for a new file under the process umask.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp, mode if mode is not None else 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def json_safe(value: Any) -> Any:
    """`value` as strict JSON can hold it: non-finite floats (a diverged loss or accuracy) become None, numpy
    scalars and arrays Python numbers and lists, tuples lists."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy scalar or array
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def strict_json(obj: Any, indent: Optional[int] = None) -> str:
    """Strict JSON text of `obj` (sorted keys; never NaN or Infinity, which other parsers refuse)."""
    return json.dumps(json_safe(obj), indent=indent, sort_keys=True, allow_nan=False)


def atomic_write_json(path: PathLike, obj: Any, mode: Optional[int] = None) -> None:
    """Strict JSON (`strict_json`), written atomically."""
    atomic_write_bytes(path, (strict_json(obj, indent=2) + "\n").encode(), mode)


def append_line(path: PathLike, line: str) -> None:
    """Append one line and fsync it (for JSONL histories); a torn last line from a crash is closed first."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a+b") as fh:
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
        fh.write((line.rstrip("\n") + "\n").encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())
