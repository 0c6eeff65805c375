"""Accuracy, per-class accuracy and the confusion matrix of an adapter on labelled images, as JSON and a PNG."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .fileio import atomic_write_bytes

log = logging.getLogger(__name__)

REPORT_JSON = "evaluation.json"
CONFUSION_PNG = "confusion.png"


@dataclass
class EvaluationReport:
    """Rows of `confusion` are the true classes, columns the predicted ones."""

    classes: List[str]
    confusion: np.ndarray
    loss: float
    skipped: Dict[str, str] = field(default_factory=dict)  # path: why it was left out
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return int(self.confusion.sum())

    @property
    def correct(self) -> int:
        return int(np.trace(self.confusion))

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples if self.samples else float("nan")

    def per_class(self) -> Dict[str, Dict[str, Any]]:
        """{class: {samples, correct, accuracy}} for every class of the bundle (accuracy None without samples)."""
        out = {}
        for i, name in enumerate(self.classes):
            n, hit = int(self.confusion[i].sum()), int(self.confusion[i, i])
            out[name] = {"samples": n, "correct": hit, "accuracy": hit / n if n else None}
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {
            **self.meta,
            "samples": self.samples,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "per_class": self.per_class(),
            "confusion": {"rows": "true class", "columns": "predicted class", "labels": list(self.classes),
                          "matrix": self.confusion.astype(int).tolist()},
            "skipped": dict(self.skipped),
        }


def score(labels: np.ndarray, logits: np.ndarray, classes: Sequence[str],
          skipped: Optional[Dict[str, str]] = None, meta: Optional[Dict[str, Any]] = None) -> EvaluationReport:
    """The report of logits (N, C) against labels (N,): confusion counts and mean cross-entropy."""
    labels = np.asarray(labels, np.int64)
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape != (len(labels), len(classes)):
        raise ValueError(f"logits of shape {list(z.shape)} for {len(labels)} labels and {len(classes)} classes")
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    if len(labels):
        np.add.at(confusion, (labels, z.argmax(axis=1)), 1)
        shifted = z - z.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = float(-log_probs[np.arange(len(labels)), labels].mean())
    else:
        loss = float("nan")
    return EvaluationReport(list(classes), confusion, loss, dict(skipped or {}), dict(meta or {}))


def summary(report: EvaluationReport) -> str:
    """A readable table: overall accuracy and loss, then one line per class."""
    width = max([len("class"), *(len(c) for c in report.classes)])
    lines = [f"accuracy {report.accuracy:.4f} ({report.correct}/{report.samples}), loss {report.loss:.4f}"
             + (f", {len(report.skipped)} images skipped" if report.skipped else ""),
             f"{'class':<{width}}  {'images':>6}  {'correct':>7}  {'accuracy':>8}"]
    for name, row in report.per_class().items():
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"{name:<{width}}  {row['samples']:>6}  {row['correct']:>7}  {acc:>8}")
    return "\n".join(lines)


def write_report(report: EvaluationReport, out_dir: Path) -> List[Path]:
    """evaluation.json always; confusion.png where matplotlib is installed. Returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / REPORT_JSON]
    atomic_write_bytes(written[0], (json.dumps(report.to_dict(), indent=2) + "\n").encode())
    png = plot_confusion(report, out_dir / CONFUSION_PNG)
    if png is not None:
        written.append(png)
    return written


def plot_confusion(report: EvaluationReport, path: Path) -> Optional[Path]:
    """The row-normalised confusion matrix as a PNG; None (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no %s (the JSON has the matrix); pip install matplotlib", path.name)
        return None
    counts = report.confusion.astype(float)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(report.classes)
    size = min(2.0 + 0.45 * n, 24.0)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(share, vmin=0.0, vmax=1.0, cmap="Blues")
    ax.set_xticks(range(n), report.classes, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), report.classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"accuracy {report.accuracy:.3f} on {report.samples} images")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if report.confusion[i, j]:
                    ax.text(j, i, str(int(report.confusion[i, j])), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
