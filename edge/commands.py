"""`flora-agent predict` and `flora-agent evaluate`: use the federation's model on this device.

    flora-agent predict --bundle B [--adapter FILE | --state-dir DIR] IMAGES...   # files, folders, globs, -
    flora-agent evaluate --bundle B [--adapter FILE | --state-dir DIR] --data DIR [--out DIR]

Both run the bundle's inference graphs only (no trainer, no broker) and default to the latest global
adapter the agent applied (its state dir), else the bundle's initial one (zero-shot CLIP).
Exit status: 0 done, 2 bad arguments or inputs (an image that cannot be decoded, without --skip-bad).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, TextIO

import numpy as np

from .config import Bounded, ConfigError, add_config_option, comma_list
from .errors import EXIT_BAD_INPUT, FloraError, report

log = logging.getLogger("flora.agent")

PROG = "flora-agent"
FORMATS = ("table", "jsonl", "csv")


def _common(p) -> None:
    add_config_option(p, "`flora-agent run` (its bundle, state dir, threads and providers are used)")
    p.add_argument("--bundle", type=Path, help="bundle folder written by flora-export")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", type=Path, help="adapter file (default: the state dir's latest global, else the "
                                                    "bundle's initial adapter)")
    which.add_argument("--state-dir", type=Path, help="the agent's state dir: use the latest global it applied")
    p.add_argument("--batch-size", type=Bounded(int, minimum=1), default=32,
                   help="images per encoder run (default %(default)s)")
    p.add_argument("--threads", type=Bounded(int, minimum=1), help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--providers", type=comma_list, help="execution providers, e.g. cuda,cpu")
    p.add_argument("--image-encoder-int8", "--int8", dest="image_encoder_int8", action="store_true", default=None,
                   help="use the bundle's int8 image encoder (flora-export --image-encoder-int8)")
    p.add_argument("--skip-bad", action="store_true", help="leave out images that cannot be decoded (default: stop)")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def add_predict_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="classify images with the federation's adapter (torch-free)",
                       description="Classify images: top-k labels and probabilities per image.")
    _common(p)
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively), glob patterns, "
                                             "or - to read paths from stdin")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default %(default)s)")
    p.add_argument("--top-k", type=Bounded(int, minimum=1), default=3, help="labels per image (default %(default)s)")
    p.add_argument("--output", "-o", type=Path, help="write here instead of stdout")
    p.add_argument("--progress", action="store_true", default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    return p


def add_evaluate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix on labelled images",
                       description="Evaluate an adapter on a labelled image folder (DIR/<class>/...) or a "
                                   "path,label CSV; writes evaluation.json and confusion.png.")
    _common(p)
    p.add_argument("--data", type=Path, required=True, help="image folder (one subfolder per class) or a CSV")
    p.add_argument("--out", type=Path, default=Path("evaluation"),
                   help="folder for evaluation.json and confusion.png (default: ./%(default)s)")
    return p


def default_state_dir(args: argparse.Namespace, config: Dict) -> None:
    """Without --adapter or --state-dir, the state dir the agent of `config` uses (its state_dir, else
    ./flora-state/<client_id>), so that its latest global is the default adapter."""
    if args.adapter is None and args.state_dir is None and config.get("client_id"):
        args.state_dir = Path(config.get("state_dir") or Path("flora-state") / str(config["client_id"]))


def _error(exc: BaseException) -> int:
    return report(PROG, exc, None if isinstance(exc, FloraError) else EXIT_BAD_INPUT)


def _open(args: argparse.Namespace):
    """(bundle, adapter choice, predictor); only the inference files of the bundle are checked."""
    from .bundle import load_bundle
    from .predict import Predictor, choose_adapter

    if args.bundle is None:
        raise ConfigError("missing --bundle (on the command line or in --config)")
    bundle = load_bundle(args.bundle, backends=())
    choice = choose_adapter(bundle, args.adapter, args.state_dir)
    print(f"adapter: {choice.description}", file=sys.stderr)
    predictor = Predictor(bundle, choice.tensors, args.threads, args.providers, int8=bool(args.image_encoder_int8))
    return bundle, choice, predictor


class ProgressBar:
    """`[#####     ] 120/1000 images, 21.3 img/s` on one stderr line (off when `enabled` is False)."""

    def __init__(self, total: int, enabled: bool, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.total, self.enabled, self.stream, self.width = total, enabled, stream, width
        self.t0 = time.perf_counter()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        filled = int(self.width * done / max(self.total, 1))
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        self.stream.write(f"\r[{'#' * filled}{' ' * (self.width - filled)}] {done}/{self.total} images, "
                          f"{rate:.1f} img/s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


class PredictionWriter:
    """Rows of path + top-k (label, probability) as an aligned table, JSON lines or CSV."""

    def __init__(self, out: TextIO, fmt: str, classes: Sequence[str], top_k: int, path_width: int) -> None:
        self.out, self.fmt, self.classes, self.k = out, fmt, list(classes), top_k
        self.path_width = max(5, min(path_width, 60))
        self.label_width = max(len(c) for c in self.classes)
        if fmt == "csv":
            self._csv = csv.writer(out)
            header = [f"{what}_{i + 1}" for i in range(self.k) for what in ("label", "probability")]
            self._csv.writerow(["path", *header])
        elif fmt == "table":
            cols = "  ".join(f"{('top-' + str(i + 1)):<{self.label_width}} {'p':>6}" for i in range(self.k))
            out.write(f"{'image':<{self.path_width}}  {cols}\n")

    def write(self, path: str, probs: np.ndarray) -> None:
        top = np.argsort(-probs, kind="stable")[: self.k]
        pairs = [(self.classes[j], float(probs[j])) for j in top]
        if self.fmt == "jsonl":
            row = {"path": path, "top": [{"label": label, "probability": round(p, 6)} for label, p in pairs]}
            self.out.write(json.dumps(row, ensure_ascii=False) + "\n")
        elif self.fmt == "csv":
            self._csv.writerow([path, *[x for label, p in pairs for x in (label, f"{p:.6f}")]])
        else:
            shown = path if len(path) <= self.path_width else "…" + path[-(self.path_width - 1):]
            cols = "  ".join(f"{label:<{self.label_width}} {p:>6.1%}" for label, p in pairs)
            self.out.write(f"{shown:<{self.path_width}}  {cols}\n")


def run_predict(args: argparse.Namespace) -> int:
    from .predict import collect_images, softmax
    from .preprocess import ImageError

    try:
        paths = collect_images(args.images)
        bundle, _, predictor = _open(args)
    except (FloraError, OSError) as exc:
        return _error(exc)
    classes = bundle.manifest.classes
    top_k = min(args.top_k, len(classes))
    names = [str(p) for p in paths]
    bar = ProgressBar(len(paths), sys.stderr.isatty() if args.progress is None else args.progress)
    skipped: Dict[str, str] = {}
    done = 0
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(args.output, "w", encoding="utf-8", newline="")) if args.output else sys.stdout
        stack.callback(bar.close)
        writer = PredictionWriter(out, args.format, classes, top_k, max(len(n) for n in names))
        batches = predictor.predict_paths(paths, args.batch_size, args.skip_bad,
                                          on_bad=lambda i, why: skipped.__setitem__(names[i], why))
        try:
            for idx, logits in batches:
                for i, probs in zip(idx, softmax(logits)):
                    writer.write(names[i], probs)
                done += len(idx)
                bar.update(done + len(skipped))
        except ImageError as exc:
            return _error(ImageError(f"{exc} (pass --skip-bad to leave such images out)"))
        except BrokenPipeError:  # `flora-agent predict ... | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    for name, why in skipped.items():
        log.warning("skipped %s: %s", name, why)
    if skipped:
        print(f"flora-agent: {len(skipped)} of {len(paths)} images could not be decoded and were skipped",
              file=sys.stderr)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .dataset import DatasetError, load_dataset
    from .preprocess import ImageError
    from .scoring import score, summary, write_report

    try:
        bundle, choice, predictor = _open(args)
        manifest = bundle.manifest
        samples = load_dataset(args.data, list(manifest.classes))
        if not samples:
            raise DatasetError(f"no images for the bundle's classes under {args.data}")
    except (FloraError, OSError) as exc:
        return _error(exc)
    paths = [s.path for s in samples]
    labels = np.array([s.label for s in samples], np.int64)
    try:
        logits, bad = _logits_of(predictor, bundle, paths, args)
    except ImageError as exc:
        return _error(ImageError(f"{exc} (pass --skip-bad to leave such images out)"))
    keep = np.array([i not in bad for i in range(len(paths))], bool)
    meta = {"bundle_model_id": manifest.model_id, "adapter": {"description": choice.description,
            "kind": choice.meta.kind, "round": choice.meta.round}, "data": str(args.data),
            "image_encoder": "int8" if args.image_encoder_int8 else "fp32"}
    report = score(labels[keep], logits, manifest.classes, {str(paths[i]): why for i, why in bad.items()}, meta)
    print(summary(report))
    written = write_report(report, args.out)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _logits_of(predictor, bundle, paths: List[Path], args: argparse.Namespace):
    """Logits of the readable images (in order) and {index: why} of the others."""
    from .features import FeatureCache, image_features, readable_image_features
    from .state import StateStore

    if predictor.encoder is not None:  # text mode: features through the agent's cache when there is one
        cache = FeatureCache(StateStore(args.state_dir).dir / "features.sqlite") if args.state_dir else None
        try:
            options = {"encoder": predictor.encoder, "batch_size": args.batch_size}
            if args.skip_bad:
                feats, bad = readable_image_features(bundle, paths, cache, **options)
            else:
                feats, bad = image_features(bundle, paths, cache, **options), {}
        finally:
            if cache is not None:
                cache.close()
        return predictor.logits_of_features(feats), bad
    bad: Dict[int, str] = {}
    rows: List[np.ndarray] = []
    for _, logits in predictor.predict_paths(paths, args.batch_size, args.skip_bad,
                                             on_bad=lambda i, why: bad.__setitem__(i, why)):
        rows.append(logits)
    n = bundle.manifest.num_classes
    return (np.concatenate(rows) if rows else np.zeros((0, n), np.float32)), bad
