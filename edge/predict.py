"""Classify images with a bundle and one adapter, torch-free: what `flora-agent predict` and `evaluate` run.

In `text` mode the class embeddings depend only on the adapter, so they are computed once: the
inference model is run on the D unit vectors and a zero vector, which gives exactly
`logit_scale * E^T` (D x C) and the logit bias. Each image then costs one image-encoder pass and
a (D x C) matmul. In `vision`/`both` mode the LoRA sits in the image tower, so every batch goes
through the inference model with the adapter as its inputs. Images are decoded one batch ahead on
a worker thread while ONNX Runtime (which releases the GIL) encodes the current one.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, TextIO, Tuple

import numpy as np

from . import adapter as adapter_blob
from .bundle import ADAPTER, INFERENCE_MODEL, Bundle
from .dataset import is_image_file
from .errors import FloraError
from .features import ImageEncoder
from .fileio import PathLike
from .ort import inference_session
from .preprocess import ImageError, preprocess, preprocess_batch
from .state import GLOBAL_FILE

log = logging.getLogger(__name__)


class PredictError(FloraError, ValueError):
    """The inputs of a prediction cannot be used (no images, a missing adapter, ...)."""


@dataclass(frozen=True)
class AdapterChoice:
    """The adapter a prediction uses, and a line that says which one it is."""

    tensors: Dict[str, np.ndarray]
    meta: adapter_blob.AdapterMeta
    description: str


def choose_adapter(bundle: Bundle, adapter: Optional[PathLike] = None,
                   state_dir: Optional[PathLike] = None) -> AdapterChoice:
    """`adapter`, else the latest global the agent applied in `state_dir`, else the bundle's initial one."""
    m = bundle.manifest
    if adapter is not None:
        path, what = Path(adapter), f"adapter {adapter}"
    elif state_dir is not None and (Path(state_dir) / GLOBAL_FILE).is_file():
        path, what = Path(state_dir) / GLOBAL_FILE, f"the latest global applied in {state_dir}"
    else:
        if state_dir is not None:
            log.info("no global adapter in %s yet: using the bundle's initial adapter", state_dir)
        path, what = bundle.path(ADAPTER), "the bundle's initial adapter (zero-shot CLIP)"
    decoded = adapter_blob.load_file(path, m.trainable, model_id=m.model_id)
    meta = decoded.meta
    if meta.kind != "initial":
        what = f"{what}: {meta.kind} adapter of round {meta.round}"
    elif adapter is not None:
        what = f"{what}: an initial adapter (round 0, zero-shot CLIP)"
    return AdapterChoice(decoded.as_float32(), meta, what)


class Predictor:
    """Logits (N, C) of images under one adapter."""

    def __init__(self, bundle: Bundle, tensors: Dict[str, np.ndarray], threads: Optional[int] = None,
                 providers: Optional[List[str]] = None, int8: bool = False) -> None:
        self.bundle = bundle
        self.manifest = m = bundle.manifest
        missing = sorted(set(m.trainable_names) - set(tensors))
        if missing:
            raise PredictError(f"adapter lacks {missing[:3]}")
        self._tensors = {n: np.ascontiguousarray(tensors[n], np.float32) for n in m.trainable_names}
        self._session = inference_session(bundle.path(INFERENCE_MODEL), threads, providers)
        self.encoder: Optional[ImageEncoder] = None
        self.head: Optional[np.ndarray] = None  # (D, C): logit_scale * class embeddings^T
        self.bias: Optional[np.ndarray] = None  # (C,)
        if m.needs_image_encoder:
            self.head, self.bias = self._class_head()
            self._session = None  # the text tower is not needed again: free its weights
            self.encoder = ImageEncoder(bundle, threads, providers, int8=int8)
        elif int8:
            raise PredictError("--int8 applies to the frozen image encoder of text-mode bundles; this bundle "
                               f"trains the {m.lora.tower} tower(s)")

    def _class_head(self) -> Tuple[np.ndarray, np.ndarray]:
        """(logit_scale * E^T, bias) from one run of the inference model on [I_D; 0]."""
        d = self.manifest.feature_dim
        probe = np.concatenate([np.eye(d, dtype=np.float32), np.zeros((1, d), np.float32)])
        logits = self._session.run(None, {"features": probe, **self._tensors})[0].astype(np.float32)
        bias = logits[d].copy()
        return np.ascontiguousarray(logits[:d] - bias), bias

    def logits_of_features(self, features: np.ndarray) -> np.ndarray:
        """Text mode: logits of image features (N, D), as the inference model computes them."""
        assert self.head is not None and self.bias is not None
        f = np.asarray(features, np.float32)
        norms = np.maximum(np.linalg.norm(f, axis=1, keepdims=True), np.float32(1e-12))
        return (f / norms) @ self.head + self.bias

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Logits of preprocessed pixels (N, 3, H, W)."""
        if self.encoder is not None:
            return self.logits_of_features(self.encoder(pixels))
        feeds = {"pixels": np.ascontiguousarray(pixels, np.float32), **self._tensors}
        return self._session.run(None, feeds)[0]

    def predict_paths(self, paths: Sequence[PathLike], batch_size: int = 32, skip_bad: bool = False,
                      on_bad: Optional[Callable[[int, str], None]] = None) -> Iterator[Tuple[List[int], np.ndarray]]:
        """(indices into `paths`, their logits) batch by batch, decoding the next batch while this one runs.

        An image that cannot be decoded raises ImageError naming it, or with `skip_bad` is reported to
        `on_bad(index, reason)` and left out.
        """
        if batch_size < 1:
            raise PredictError(f"batch size must be >= 1, got {batch_size}")
        batches = [list(range(i, min(i + batch_size, len(paths)))) for i in range(0, len(paths), batch_size)]
        if not batches:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
            ahead: Future = pool.submit(self._decode, paths, batches[0], skip_bad)
            for k in range(len(batches)):
                pixels, ok, bad = ahead.result()
                if k + 1 < len(batches):
                    ahead = pool.submit(self._decode, paths, batches[k + 1], skip_bad)
                for i, reason in bad:
                    if on_bad is not None:
                        on_bad(i, reason)
                if ok:
                    yield ok, self.logits(pixels)

    def _decode(self, paths: Sequence[PathLike], idx: List[int],
                skip_bad: bool) -> Tuple[np.ndarray, List[int], List[Tuple[int, str]]]:
        pre = self.manifest.preprocess
        try:
            return preprocess_batch([paths[i] for i in idx], pre), idx, []
        except ImageError:
            if not skip_bad:
                raise
        arrays, ok, bad = [], [], []
        for i in idx:
            try:
                arrays.append(preprocess(paths[i], pre))
                ok.append(i)
            except ImageError as exc:
                bad.append((i, str(exc)))
        return (np.stack(arrays) if arrays else np.zeros((0,), np.float32)), ok, bad


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


# -- which files ---------------------------------------------------------------------------------------
def collect_images(items: Iterable[str], stdin: Optional[TextIO] = None) -> List[Path]:
    """Files as given, image files under folders (recursively, sorted), glob patterns expanded; `-` reads
    one path per line from `stdin`. Repeats are kept once, in first-seen order."""
    found: List[Path] = []
    for item in items:
        if item == "-":
            source = stdin if stdin is not None else sys.stdin
            found.extend(Path(line.strip()) for line in source if line.strip())
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            found.extend(p for p in sorted(path.rglob("*")) if p.is_file() and is_image_file(p)
                         and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.exists() or not glob.has_magic(item):
            found.append(path)  # a missing file is reported when it is read
        else:
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            if not matches:
                raise PredictError(f"no file matches {item!r}")
            found.extend(Path(p) for p in matches if Path(p).is_file())
    unique = list(dict.fromkeys(found))
    if not unique:
        raise PredictError("no images to classify")
    return unique
