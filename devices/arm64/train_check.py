"""The short training of devices/verify-arm64.sh --bundle, run under qemu-aarch64 on a bundle exported with the
step graph: PNGs made on the spot, their features through the bundle's image encoder (text mode) or their
pixels (vision mode), then the project's own round loop (`flora.edge.training.train_round`) on the `step`
trainer. Prints a FLORA_ARM64_TRAIN JSON line (the batches in the order trained, the losses) and a PASS/FAIL
line, and writes OUT/train.npz (inputs, labels, losses, the trained adapter): tests/test_arm64.py replays the
same round on the host and compares.

    python3 devices/arm64/train_check.py BUNDLE OUT
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
from PIL import Image

from flora.edge.bundle import load_bundle
from flora.edge.features import image_features
from flora.edge.preprocess import preprocess_batch
from flora.edge.trainers import StepResult, available_backends, open_trainer
from flora.edge.training import LocalData, evaluate, train_round

BATCH, EPOCHS, LR, PER_CLASS, SEED = 8, 3, 5e-3, 2, 0


def make_images(folder: Path, num_classes: int) -> Tuple[List[Path], np.ndarray]:
    """PER_CLASS small PNGs per class with deterministic patterns (no RNG, so any numpy agrees)."""
    paths, labels = [], []
    for c in range(num_classes):
        for k in range(PER_CLASS):
            a = ((np.arange(40 * 48 * 3).reshape(40, 48, 3) * (7 * c + 3 * k + 1)) % 251).astype(np.uint8)
            path = folder / f"class{c:03d}-{k}.png"
            Image.fromarray(a).save(path)
            paths.append(path)
            labels.append(c)
    return paths, np.array(labels, dtype=np.int64)


def main(bundle_dir: str, out: Path) -> int:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    paths, labels = make_images(out, m.num_classes)
    if m.needs_image_encoder:
        inputs = image_features(bundle, paths, None, batch_size=BATCH, providers=["cpu"])
    else:
        inputs = preprocess_batch(paths, m.preprocess)
    trainer = open_trainer(bundle, "step")
    trainer.set_lr(LR)
    data = LocalData(labels, features=inputs)
    before = evaluate(trainer, data).loss
    batches: List[List[int]] = []
    losses: List[float] = []

    def on_step(idx: np.ndarray, step: StepResult) -> None:
        batches.append(idx.tolist())
        losses.append(step.loss)

    train_round(trainer, data, epochs=EPOCHS, batch_size=BATCH, seed=SEED, on_step=on_step)
    after = evaluate(trainer, data).loss
    adapter = {f"adapter/{k}": v for k, v in trainer.get_adapter().items()}
    np.savez(out / "train.npz", inputs=inputs, labels=labels, losses=np.array(losses), **adapter)
    result = {"machine": platform.machine(), "python": platform.python_version(), "trainer": trainer.name,
              "backends": available_backends(bundle), "input_kind": m.input_kind, "batch": BATCH,
              "epochs": EPOCHS, "lr": LR, "seed": SEED, "images": len(paths), "steps": len(losses),
              "batches": batches, "losses": losses, "loss_before": before, "loss_after": after,
              "seconds": time.perf_counter() - t0, "npz": str(out / "train.npz")}
    print("FLORA_ARM64_TRAIN " + json.dumps(result), flush=True)
    problems = []
    if result["machine"] != "aarch64":
        problems.append(f"machine is {result['machine']!r}, not aarch64")
    if trainer.name != "step":
        problems.append(f"trainer is {trainer.name}, not step")
    if not all(math.isfinite(x) for x in [*losses, before, after]):
        problems.append("a loss is not finite")
    elif not after < before:
        problems.append(f"the loss on the training images did not fall ({before:.4f} -> {after:.4f})")
    detail = (f"{len(losses)} step-backend steps of train_round at batch {BATCH} on {len(paths)} {m.input_kind} "
              f"inputs from PNGs: loss {before:.4f} -> {after:.4f} ({result['seconds']:.1f} s)")
    print(f"{'FAIL' if problems else 'PASS'} train: {'; '.join(problems) or detail}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
