"""One measurement in a fresh process (so its memory is its own): prints one JSON line.

    python -m bench.step_worker ort-training BUNDLE --batch 32 --steps 10
    python -m bench.step_worker step BUNDLE --batch 32
    python -m bench.step_worker torch BUNDLE --batch 32        # PyTorch eager LoRA step, same model
    python -m bench.step_worker features BUNDLE --batch 32     # image encoder, ms per image
    python -m bench.step_worker agent BUNDLE --backend step    # text mode as an agent runs it
    python -m bench.step_worker full BUNDLE --batch 32         # PyTorch full fine-tuning, every CLIP weight

Memory: `load_peak_mb` is the process's peak resident set once the model is ready (Linux VmHWM);
then the peak is reset (gc, malloc_trim, /proc/self/clear_refs) and `train_peak_mb` is the peak
over the training steps alone, which starts from everything still resident. The PyTorch worker
builds a whole CLIP to get the same weights, then keeps only what the classifier uses (in text mode
the text tower: the image tower is dropped), so its training peak is what PyTorch needs to train.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import statistics
import sys
import time
from typing import Callable, Dict, List

import numpy as np


def vm_hwm_mb() -> float:
    """Peak resident set size since start or the last reset_peak(), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    """Free what can be freed and restart the peak counter at the current resident set."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _batch(manifest, batch: int, rng: np.random.Generator):
    x = rng.standard_normal(manifest.input_shape(batch)).astype(np.float32)
    y = rng.integers(0, manifest.num_classes, batch).astype(np.int64)
    return x, y


def _time(step: Callable[[], object], warmup: int, steps: int) -> List[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _measured(step: Callable[[], object], warmup: int, steps: int) -> Dict:
    load_peak = vm_hwm_mb()
    reset_peak()
    times = _time(step, warmup, steps)
    return {"step_s": statistics.median(times), "load_peak_mb": load_peak, "train_peak_mb": vm_hwm_mb()}


def _epoch_1000_cached(trainer, manifest, batch: int) -> float:
    """Seconds for one epoch over 1000 cached image features, as a device trains in text mode."""
    feats = np.random.default_rng(1).standard_normal((1000, manifest.feature_dim)).astype(np.float32)
    labels = np.random.default_rng(2).integers(0, manifest.num_classes, 1000)
    t0 = time.perf_counter()
    for start in range(0, 1000, batch):
        trainer.train_step(feats[start : start + batch], labels[start : start + batch])
    return time.perf_counter() - t0


def measure_onnx(backend: str, bundle_dir: str, batch: int, warmup: int, steps: int, threads: int) -> Dict:
    from flora.edge.bundle import load_bundle
    from flora.edge.trainers import open_trainer

    bundle = load_bundle(bundle_dir, verify=False)
    t0 = time.perf_counter()
    trainer = open_trainer(bundle, backend, threads=threads)
    load_s = time.perf_counter() - t0
    trainer.set_lr(1e-4)
    x, y = _batch(bundle.manifest, batch, np.random.default_rng(0))
    result = _measured(lambda: trainer.train_step(x, y), warmup, steps)
    result["session_load_s"] = load_s
    if bundle.manifest.input_kind == "features":
        result["epoch_1000_cached_s"] = _epoch_1000_cached(trainer, bundle.manifest, batch)
    return result


def measure_torch(bundle_dir: str, batch: int, warmup: int, steps: int, threads: int) -> Dict:
    import torch

    from flora.edge.bundle import load_bundle
    from flora.export.graphs import build_classifier, tokenize_prompts
    from flora.export.loading import WeightsSource, build_model
    from flora.export.lora import LoraSpec, attach_lora
    from flora.export.presets import get_preset

    torch.set_num_threads(threads)
    m = load_bundle(bundle_dir, verify=False).manifest
    preset = get_preset(m.preset)
    model = build_model(preset, WeightsSource("random-init", None, None, False, 0))
    params = attach_lora(model, LoraSpec(m.lora.tower, m.lora.rank, m.lora.alpha, m.lora.targets))
    tokens = tokenize_prompts(list(m.classes), m.prompt_template, preset.architecture)
    classifier, _ = build_classifier(model, tokens, m.lora.tower)
    del model  # text mode: the image tower and token embedding go; the classifier holds the rest
    opt = torch.optim.AdamW(params.values(), lr=1e-4, eps=1e-8, weight_decay=0.0)
    x, y = _batch(m, batch, np.random.default_rng(0))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(classifier(xt), yt)
        loss.backward()
        opt.step()

    return _measured(step, warmup, steps)


def measure_full(bundle_dir: str, batch: int, warmup: int, steps: int, threads: int) -> Dict:
    """PyTorch full fine-tuning of the bundle's CLIP (both towers, every weight, AdamW) on pixel batches."""
    import torch

    from bench.full_finetune import full_finetune_step
    from flora.edge.bundle import load_bundle
    from flora.export.graphs import tokenize_prompts
    from flora.export.loading import WeightsSource, build_model
    from flora.export.presets import get_preset

    torch.set_num_threads(threads)
    m = load_bundle(bundle_dir, verify=False).manifest
    preset = get_preset(m.preset)
    model = build_model(preset, WeightsSource("random-init", None, None, False, 0))
    tokens = tokenize_prompts(list(m.classes), m.prompt_template, preset.architecture)
    size = m.preprocess.image_size
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch, 3, size, size)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, m.num_classes, batch).astype(np.int64))
    step, params = full_finetune_step(model, tokens, x, y)
    result = _measured(step, warmup, steps)
    result["params_trained"] = sum(p.numel() for p in params if p.requires_grad)
    result["params_total"] = sum(p.numel() for p in model.parameters())
    return result


def measure_features(bundle_dir: str, batch: int, warmup: int, steps: int, threads: int) -> Dict:
    from flora.edge.bundle import load_bundle
    from flora.edge.features import ImageEncoder

    bundle = load_bundle(bundle_dir, verify=False)
    encoder = ImageEncoder(bundle, threads=threads)
    size = bundle.manifest.preprocess.image_size
    pixels = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    result = _measured(lambda: encoder(pixels), warmup, steps)
    result["batch_s"] = result.pop("step_s")
    result["per_image_s"] = result["batch_s"] / batch
    return result


def measure_agent(backend: str, bundle_dir: str, batch: int, threads: int, images: int = 256) -> Dict:
    """Text mode as flora-agent holds it: the trainer opened first, then the image encoder computes
    the features of `images` images at batch 32, then one epoch of training over them."""
    from flora.edge.bundle import load_bundle
    from flora.edge.features import ImageEncoder
    from flora.edge.trainers import open_trainer

    bundle = load_bundle(bundle_dir, verify=False)
    manifest = bundle.manifest
    if manifest.input_kind != "features":
        raise SystemExit("the agent measurement is for text-mode bundles")
    trainer = open_trainer(bundle, backend, threads=threads)
    encoder = ImageEncoder(bundle, threads=threads)
    size = manifest.preprocess.image_size
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    feats = np.concatenate([
        encoder(rng.standard_normal((min(32, images - i), 3, size, size)).astype(np.float32))
        for i in range(0, images, 32)
    ])
    features_s = time.perf_counter() - t0
    del encoder  # as the agent does once the features are cached
    labels = rng.integers(0, manifest.num_classes, images)
    t0 = time.perf_counter()
    for start in range(0, images, batch):
        trainer.train_step(feats[start : start + batch], labels[start : start + batch])
    return {"images": images, "features_s": features_s, "epoch_s": time.perf_counter() - t0,
            "peak_mb": vm_hwm_mb()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["ort-training", "step", "torch", "full", "features", "agent"])
    p.add_argument("bundle")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="auto", help="for `agent`: the trainer backend")
    a = p.parse_args(argv)
    if a.what == "torch":
        result = measure_torch(a.bundle, a.batch, a.warmup, a.steps, a.threads)
    elif a.what == "full":
        result = measure_full(a.bundle, a.batch, a.warmup, a.steps, a.threads)
    elif a.what == "features":
        result = measure_features(a.bundle, a.batch, a.warmup, a.steps, a.threads)
    elif a.what == "agent":
        result = measure_agent(a.backend, a.bundle, a.batch, a.threads)
    else:
        result = measure_onnx(a.what, a.bundle, a.batch, a.warmup, a.steps, a.threads)
    result.update(what=a.what, batch=a.batch, threads=a.threads)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
