"""Image features for `text`-mode bundles: computed once with image_encoder.onnx, cached on disk.

The cache is an SQLite file keyed by (the bundle's model_id, sha256 of the image file's bytes):
a changed image gets a new key and a new model invalidates all of its entries, while everything
else is reused across rounds and restarts. Pixels are decoded only for images not in the cache.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .bundle import IMAGE_ENCODER, Bundle
from .fileio import PathLike
from .ort import inference_session
from .preprocess import preprocess_batch

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    model_id TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (model_id, image_sha256)
)
"""


def file_sha256(path: PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class FeatureCache:
    """Persistent (model_id, image hash) -> float32 feature vector store."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path))
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._db.commit()

    def get_many(self, model_id: str, hashes: Sequence[str]) -> Dict[str, np.ndarray]:
        found: Dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(hashes))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT image_sha256, dim, vector FROM features WHERE model_id = ? AND image_sha256 IN ({marks})",
                [model_id, *chunk],
            )
            for sha, dim, blob in rows:
                vec = np.frombuffer(blob, dtype=np.float32)
                if vec.size == dim:
                    found[sha] = vec
        return found

    def put_many(self, model_id: str, items: Dict[str, np.ndarray]) -> None:
        rows = [(model_id, sha, int(v.size), np.ascontiguousarray(v, np.float32).tobytes()) for sha, v in items.items()]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?)", rows)

    def prune(self, keep_model_id: str) -> int:
        """Drop the entries of every other model; returns how many went."""
        with self._db:
            cur = self._db.execute("DELETE FROM features WHERE model_id != ?", (keep_model_id,))
        return cur.rowcount

    def count(self, model_id: Optional[str] = None) -> int:
        if model_id is None:
            return int(self._db.execute("SELECT COUNT(*) FROM features").fetchone()[0])
        return int(self._db.execute("SELECT COUNT(*) FROM features WHERE model_id = ?", (model_id,)).fetchone()[0])

    def close(self) -> None:
        self._db.close()


class ImageEncoder:
    """The bundle's frozen image tower: preprocessed pixels (N,3,H,W) -> features (N,D)."""

    def __init__(self, bundle: Bundle, threads: Optional[int] = None, providers: Optional[List[str]] = None) -> None:
        self.bundle = bundle
        self._session = inference_session(bundle.path(IMAGE_ENCODER), threads, providers)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self._session.run(None, {"pixels": np.ascontiguousarray(pixels, np.float32)})[0]


def image_features(
    bundle: Bundle,
    paths: Sequence[PathLike],
    cache: Optional[FeatureCache] = None,
    *,
    batch_size: int = 32,
    encoder: Optional[ImageEncoder] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    threads: Optional[int] = None,
    providers: Optional[List[str]] = None,
) -> np.ndarray:
    """Features (N, D) of the images, from the cache where present, else computed (and cached).

    The image encoder session is only created (with `threads` and `providers`) if an image misses.
    """
    manifest = bundle.manifest
    if not manifest.needs_image_encoder:
        raise ValueError("this bundle trains the image tower; it takes pixels, not cached features")
    hashes = [file_sha256(p) for p in paths]
    cached = cache.get_many(manifest.model_id, hashes) if cache is not None else {}
    todo = [i for i, h in enumerate(hashes) if h not in cached]
    first_of = {}
    for i in todo:
        first_of.setdefault(hashes[i], i)
    missing = list(first_of.values())
    if missing:
        encoder = encoder or ImageEncoder(bundle, threads, providers)
        t0 = time.perf_counter()
        computed: Dict[str, np.ndarray] = {}
        for start in range(0, len(missing), batch_size):
            idx = missing[start : start + batch_size]
            feats = encoder(preprocess_batch([paths[i] for i in idx], manifest.preprocess))
            for i, f in zip(idx, feats):
                computed[hashes[i]] = f.astype(np.float32)
            if cache is not None:
                cache.put_many(manifest.model_id, {hashes[i]: computed[hashes[i]] for i in idx})
            if progress:
                progress(min(start + batch_size, len(missing)), len(missing))
        cached.update(computed)
        dt = time.perf_counter() - t0
        log.info("computed features of %d images in %.1f s (%.1f ms/image); %d from the cache",
                 len(missing), dt, 1e3 * dt / len(missing), len(paths) - len(todo))
    else:
        log.info("all %d image features came from the cache", len(paths))
    if not paths:
        return np.zeros((0, manifest.feature_dim), np.float32)
    return np.stack([cached[h] for h in hashes])
