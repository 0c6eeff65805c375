"""One measurement in a fresh process (so peak RSS is its own): prints one JSON line.

    python -m bench.step_worker ort-training BUNDLE --batch 32 --steps 10
    python -m bench.step_worker step BUNDLE --batch 32
    python -m bench.step_worker torch BUNDLE --batch 32        # PyTorch eager LoRA step, same model
    python -m bench.step_worker features BUNDLE --batch 32     # image encoder, ms per image
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def _batch(manifest, batch: int, rng: np.random.Generator):
    x = rng.standard_normal(manifest.input_shape(batch)).astype(np.float32)
    y = rng.integers(0, manifest.num_classes, batch).astype(np.int64)
    return x, y


def _time(step, warmup: int, steps: int) -> list:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def measure_onnx(backend: str, bundle_dir: str, batch: int, warmup: int, steps: int, threads: int) -> dict:
    from edge.bundle import load_bundle
    from edge.trainers import open_trainer

    bundle = load_bundle(bundle_dir, verify=False)
    t0 = time.perf_counter()
    trainer = open_trainer(bundle, backend, threads=threads)
    load_s = time.perf_counter() - t0
    trainer.set_lr(1e-4)
    x, y = _batch(bundle.manifest, batch, np.random.default_rng(0))
    times = _time(lambda: trainer.train_step(x, y), warmup, steps)
    result = {"step_s": statistics.median(times), "session_load_s": load_s}
    if bundle.manifest.input_kind == "features":
        # an epoch over 1000 cached images, as a device trains in text mode
        feats = np.random.default_rng(1).standard_normal((1000, bundle.manifest.feature_dim)).astype(np.float32)
        labels = np.random.default_rng(2).integers(0, bundle.manifest.num_classes, 1000)
        t0 = time.perf_counter()
        for start in range(0, 1000, batch):
            trainer.train_step(feats[start : start + batch], labels[start : start + batch])
        result["epoch_1000_cached_s"] = time.perf_counter() - t0
    return result


def measure_torch(bundle_dir: str, batch: int, warmup: int, steps: int, threads: int) -> dict:
    import torch

    from edge.bundle import load_bundle
    from export.graphs import build_classifier, tokenize_prompts
    from export.loading import WeightsSource, build_model
    from export.lora import LoraSpec, attach_lora
    from export.presets import get_preset

    torch.set_num_threads(threads)
    m = load_bundle(bundle_dir, verify=False).manifest
    preset = get_preset(m.preset)
    model = build_model(preset, WeightsSource("random-init", None, None, False, 0))
    params = attach_lora(model, LoraSpec(m.lora.tower, m.lora.rank, m.lora.alpha, m.lora.targets))
    tokens = tokenize_prompts(list(m.classes), m.prompt_template, preset.architecture)
    classifier, _ = build_classifier(model, tokens, m.lora.tower)
    opt = torch.optim.AdamW(params.values(), lr=1e-4, eps=1e-8, weight_decay=0.0)
    x, y = _batch(m, batch, np.random.default_rng(0))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(classifier(xt), yt)
        loss.backward()
        opt.step()

    return {"step_s": statistics.median(_time(step, warmup, steps))}


def measure_features(bundle_dir: str, batch: int, warmup: int, steps: int, threads: int) -> dict:
    from edge.bundle import load_bundle
    from edge.features import ImageEncoder

    bundle = load_bundle(bundle_dir, verify=False)
    encoder = ImageEncoder(bundle, threads=threads)
    size = bundle.manifest.preprocess.image_size
    pixels = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    times = _time(lambda: encoder(pixels), warmup, steps)
    return {"batch_s": statistics.median(times), "per_image_s": statistics.median(times) / batch}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["ort-training", "step", "torch", "features"])
    p.add_argument("bundle")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if a.what == "torch":
        result = measure_torch(a.bundle, a.batch, a.warmup, a.steps, a.threads)
    elif a.what == "features":
        result = measure_features(a.bundle, a.batch, a.warmup, a.steps, a.threads)
    else:
        result = measure_onnx(a.what, a.bundle, a.batch, a.warmup, a.steps, a.threads)
    from edge.training import peak_rss_mb

    result.update(what=a.what, batch=a.batch, threads=a.threads, peak_rss_mb=peak_rss_mb())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
