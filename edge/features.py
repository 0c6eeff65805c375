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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .bundle import IMAGE_ENCODER, IMAGE_ENCODER_INT8, Bundle, BundleError, Manifest, Preprocess
from .fileio import PathLike
from .ort import inference_session
from .preprocess import ImageError, preprocess, preprocess_batch

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


def feature_key(model_id: str, int8: bool = False) -> str:
    """The cache's model key: the bundle's model_id, marked for the int8 image encoder's features."""
    return f"{model_id}+int8" if int8 else model_id


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
        """Drop the entries of every other model (its fp32 and int8 features are kept); returns how many went."""
        with self._db:
            cur = self._db.execute("DELETE FROM features WHERE model_id NOT IN (?, ?)",
                                   (keep_model_id, feature_key(keep_model_id, int8=True)))
        return cur.rowcount

    def count(self, model_id: Optional[str] = None) -> int:
        if model_id is None:
            return int(self._db.execute("SELECT COUNT(*) FROM features").fetchone()[0])
        return int(self._db.execute("SELECT COUNT(*) FROM features WHERE model_id = ?", (model_id,)).fetchone()[0])

    def close(self) -> None:
        self._db.close()


class ImageEncoder:
    """The bundle's frozen image tower: preprocessed pixels (N,3,H,W) -> features (N,D).

    With `int8`, the bundle's int8 image encoder (`flora-export --image-encoder-int8`).
    """

    def __init__(self, bundle: Bundle, threads: Optional[int] = None, providers: Optional[List[str]] = None,
                 int8: bool = False) -> None:
        self.bundle = bundle
        self.int8 = int8
        name = IMAGE_ENCODER_INT8 if int8 else IMAGE_ENCODER
        if int8 and name not in bundle.manifest.files:
            raise BundleError(f"bundle {bundle.root} has no int8 image encoder ({IMAGE_ENCODER_INT8}): export it "
                              "with flora-export --image-encoder-int8")
        self._session = inference_session(bundle.path(name), threads, providers)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self._session.run(None, {"pixels": np.ascontiguousarray(pixels, np.float32)})[0]


class ProgressMeter:
    """Periodic progress lines for a long phase: done/total, percent, items per second, time left."""

    def __init__(self, what: str, total: int, every_s: float = 5.0,
                 callback: Optional[Callable[[int, int], None]] = None) -> None:
        self.what, self.total, self.every_s, self.callback = what, total, every_s, callback
        self.t0 = self._last = time.perf_counter()

    def update(self, done: int) -> None:
        if self.callback is not None:
            self.callback(done, self.total)
        now = time.perf_counter()
        if now - self._last < self.every_s and done < self.total:
            return
        self._last = now
        rate = done / max(now - self.t0, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        log.info("%s: %d/%d images (%.0f%%), %.1f img/s, %.0f s left", self.what, done, self.total,
                 100.0 * done / max(self.total, 1), rate, left)


def image_features(
    bundle: Bundle,
    paths: Sequence[PathLike],
    cache: Optional[FeatureCache] = None,
    **options: Any,
) -> np.ndarray:
    """Features (N, D) of the images, from the cache where present, else computed (and cached).

    Options (see `_features`): batch_size, encoder, progress, progress_every_s, threads, providers, int8
    (the int8 image encoder; its features are cached under their own key).
    The image encoder session is only created (with `threads` and `providers`) if an image misses.
    While computing, a progress line (images done/total, img/s) is logged every `progress_every_s`
    seconds and at the end; `progress(done, total)` is called after every batch. An unreadable
    image raises ImageError naming it (see `readable_image_features` to skip those instead).
    """
    feats, _ = _features(bundle, paths, cache, skip=False, **options)
    return feats


def readable_image_features(
    bundle: Bundle,
    paths: Sequence[PathLike],
    cache: Optional[FeatureCache] = None,
    **options,
) -> Tuple[np.ndarray, Dict[int, str]]:
    """As `image_features`, but an image that cannot be read or decoded is skipped: returns the
    features of the readable images (in order) and {index into paths: reason} of the others."""
    return _features(bundle, paths, cache, skip=True, **options)


def _features(
    bundle: Bundle,
    paths: Sequence[PathLike],
    cache: Optional[FeatureCache],
    *,
    skip: bool,
    batch_size: int = 32,
    encoder: Optional[ImageEncoder] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    progress_every_s: float = 5.0,
    threads: Optional[int] = None,
    providers: Optional[List[str]] = None,
    int8: bool = False,
) -> Tuple[np.ndarray, Dict[int, str]]:
    manifest = bundle.manifest
    if not manifest.needs_image_encoder:
        raise ValueError("this bundle trains the image tower; it takes pixels, not cached features")
    int8 = encoder.int8 if encoder is not None else int8
    key = feature_key(manifest.model_id, int8)
    bad: Dict[int, str] = {}
    hashes = _hashes(paths, bad if skip else None)
    cached = cache.get_many(key, [h for h in hashes if h]) if cache is not None else {}
    first_of: Dict[str, int] = {}
    for i, h in enumerate(hashes):
        if h and h not in cached:
            first_of.setdefault(h, i)
    missing = list(first_of.values())
    if missing:
        hits = sum(1 for h in hashes if h in cached)
        encoder = encoder or ImageEncoder(bundle, threads, providers, int8=int8)
        t0 = time.perf_counter()
        computed = _encode(encoder, paths, hashes, missing, manifest, key, cache, batch_size, bad if skip else None,
                           ProgressMeter("image features", len(missing), progress_every_s, progress))
        dt = time.perf_counter() - t0
        log.info("computed features of %d images in %.1f s (%.1f ms/image); %d from the cache",
                 len(computed), dt, 1e3 * dt / len(missing), hits)
        cached.update(computed)
    else:
        log.info("all %d image features came from the cache", len(paths))
    broken = {h for i, h in enumerate(hashes) if i in bad and h}
    for i, h in enumerate(hashes):  # a copy of an undecodable file is undecodable too
        if h in broken and i not in bad:
            bad[i] = bad[first_of[h]]
    rows = [cached[h] for i, h in enumerate(hashes) if i not in bad]
    if not rows:
        return np.zeros((0, manifest.feature_dim), np.float32), bad
    return np.stack(rows), bad


def _hashes(paths: Sequence[PathLike], bad: Optional[Dict[int, str]]) -> List[str]:
    """Content hashes; "" for a file that cannot be read when skipping (`bad` collects why)."""
    hashes: List[str] = []
    for i, path in enumerate(paths):
        try:
            hashes.append(file_sha256(path))
        except OSError as exc:
            if bad is None:
                raise
            bad[i] = f"cannot read it: {exc}"
            hashes.append("")
    return hashes


def _encode(encoder: ImageEncoder, paths: Sequence[PathLike], hashes: Sequence[str], missing: Sequence[int],
            manifest: Manifest, key: str, cache: Optional[FeatureCache], batch_size: int,
            bad: Optional[Dict[int, str]],
            meter: ProgressMeter) -> Dict[str, np.ndarray]:
    """Features of the images at `missing` (one per distinct hash), cached batch by batch."""
    computed: Dict[str, np.ndarray] = {}
    for start in range(0, len(missing), batch_size):
        pixels, idx = _decode(paths, missing[start : start + batch_size], manifest.preprocess, bad)
        if idx:
            for i, f in zip(idx, encoder(pixels)):
                computed[hashes[i]] = f.astype(np.float32)
            if cache is not None:
                cache.put_many(key, {hashes[i]: computed[hashes[i]] for i in idx})
        meter.update(min(start + batch_size, len(missing)))
    return computed


def _decode(paths: Sequence[PathLike], idx: Sequence[int], pre: Preprocess,
            bad: Optional[Dict[int, str]]) -> Tuple[np.ndarray, List[int]]:
    """Pixels of the images at `idx`; with `bad`, undecodable ones are left out (and recorded there)."""
    try:
        return preprocess_batch([paths[i] for i in idx], pre), list(idx)
    except ImageError:
        if bad is None:
            raise
    arrays, ok = [], []
    for i in idx:
        try:
            arrays.append(preprocess(paths[i], pre))
            ok.append(i)
        except ImageError as exc:
            bad[i] = str(exc)
    return (np.stack(arrays) if arrays else np.zeros((0,), np.float32)), ok
