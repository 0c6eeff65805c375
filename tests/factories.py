"""Synthetic manifests and adapters for tests that need no exported model."""

from __future__ import annotations

import hashlib
from typing import Dict

import numpy as np

from edge.bundle import FORMAT, FORMAT_VERSION, Manifest


def synthetic_manifest(blocks: int = 2, width: int = 16, rank: int = 4, targets=("q", "k", "v", "out"),
                       tower: str = "text") -> Manifest:
    """A manifest with the LoRA tensor layout of a `blocks`-deep, `width`-wide text tower."""
    trainable = []
    for i in range(blocks):
        for t in targets:
            group = "mlp" if t in ("fc", "proj") else "attn"
            out_f = 4 * width if t == "fc" else width
            in_f = 4 * width if t == "proj" else width
            trainable.append({"name": f"{tower}.resblocks.{i}.{group}.{t}.lora_A", "shape": [rank, in_f]})
            trainable.append({"name": f"{tower}.resblocks.{i}.{group}.{t}.lora_B", "shape": [out_f, rank]})
    model_id = hashlib.sha256(f"synthetic-{blocks}-{width}-{rank}-{targets}".encode()).hexdigest()
    return Manifest.from_dict({
        "format": FORMAT, "format_version": FORMAT_VERSION, "model_id": model_id, "preset": "synthetic",
        "architecture": "synthetic", "base_weights_sha256": "0" * 64,
        "lora": {"tower": tower, "rank": rank, "alpha": 2.0 * rank, "targets": list(targets)},
        "trainable": trainable, "classes": ["a", "b", "c"], "prompt_template": "a photo of a {}.",
        "text_context": 8, "preprocess": {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
        "input_kind": "features", "feature_dim": width, "logit_scale": 100.0, "backends": ["step"],
        "files": {},
    })


def random_adapter(manifest: Manifest, seed: int, dtype=np.float32, scale: float = 0.1) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: (rng.standard_normal(t.shape) * scale).astype(dtype) for t in manifest.trainable}


def vitb32_manifest() -> Manifest:
    """The layout of ViT-B/32's text tower at the default LoRA (12 blocks, width 512, rank 8, q,k,v,out)."""
    return synthetic_manifest(blocks=12, width=512, rank=8)
