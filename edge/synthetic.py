"""Synthetic manifests, adapters and bundle folders for tests and benchmarks that need no exported model (and no
torch). Runtime code never imports this module."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from flora.edge import adapter
from flora.edge.bundle import ADAPTER, FORMAT, FORMAT_VERSION, MANIFEST, Manifest, required_files
from flora.edge.fileio import sha256_bytes


def synthetic_manifest(blocks: int = 2, width: int = 16, rank: int = 4, targets: Sequence[str] = ("q", "k", "v", "out"),
                       tower: str = "text", classes: Sequence[str] = ("a", "b", "c"),
                       backends: Sequence[str] = ("step",)) -> Manifest:
    """A manifest with the LoRA tensor layout of a `blocks`-deep, `width`-wide tower (lora_A (r, in), lora_B (out, r)).

    `tower="both"` lists the text tower's tensors, then the vision tower's. The model_id is a hash of
    the layout, so two calls with the same arguments describe the same model.
    """
    towers = ("text", "vision") if tower == "both" else (tower,)
    trainable = []
    for name in towers:
        for i in range(blocks):
            for t in targets:
                group = "mlp" if t in ("fc", "proj") else "attn"
                out_f = 4 * width if t == "fc" else width
                in_f = 4 * width if t == "proj" else width
                trainable.append({"name": f"{name}.resblocks.{i}.{group}.{t}.lora_A", "shape": [rank, in_f]})
                trainable.append({"name": f"{name}.resblocks.{i}.{group}.{t}.lora_B", "shape": [out_f, rank]})
    model_id = hashlib.sha256(f"synthetic-{tower}-{blocks}-{width}-{rank}-{tuple(targets)}-{tuple(classes)}"
                              .encode()).hexdigest()
    return Manifest.from_dict({
        "format": FORMAT, "format_version": FORMAT_VERSION, "model_id": model_id, "preset": "synthetic",
        "architecture": "synthetic", "base_weights_sha256": "0" * 64,
        "lora": {"tower": tower, "rank": rank, "alpha": 2.0 * rank, "targets": list(targets)},
        "trainable": trainable, "classes": list(classes), "prompt_template": "a photo of a {}.",
        "text_context": 8, "preprocess": {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
        "input_kind": "features", "feature_dim": width, "logit_scale": 100.0, "backends": list(backends),
        "files": {},
    })


def vitb32_manifest() -> Manifest:
    """ViT-B/32's text tower at the default LoRA: 12 blocks, width 512, rank 8 on q, k, v, out
    (96 tensors, 393,216 floats)."""
    return synthetic_manifest(blocks=12, width=512, rank=8)


def random_adapter(manifest: Manifest, seed: int, dtype=np.float32, scale: float = 0.1) -> Dict[str, np.ndarray]:
    """Random LoRA tensors for every trainable tensor of `manifest` (reproducible by `seed`)."""
    rng = np.random.default_rng(seed)
    return {t.name: (rng.standard_normal(t.shape) * scale).astype(dtype) for t in manifest.trainable}


def encode_update(manifest: Manifest, tensors: Mapping[str, np.ndarray], client_id: str, round_: int,
                  num_samples: int, dtype: str = "float32", model_id: Optional[str] = None) -> bytes:
    """An `update` adapter blob as an agent publishes it."""
    return adapter.encode(tensors, model_id=model_id or manifest.model_id, round=round_, kind="update",
                          client_id=client_id, num_samples=num_samples, dtype=dtype)


def write_bundle(root: Path, manifest: Manifest, initial: Optional[Mapping[str, np.ndarray]] = None) -> Path:
    """A bundle folder holding only manifest.json and the initial adapter.safetensors (kind=initial).

    Enough for the aggregator (it loads a bundle without verifying the model files unless it evaluates);
    the ONNX files the manifest lists are absent, so `load_bundle(root, verify=True)` refuses it.
    Returns the folder; `load_manifest(root)` gives back a manifest equal to `manifest` plus its file list.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tensors = initial if initial is not None else random_adapter(manifest, seed=0, scale=0.01)
    blob = adapter.encode(tensors, model_id=manifest.model_id, round=0, kind="initial")
    (root / ADAPTER).write_bytes(blob)
    files = {name: sha256_bytes(b"") for name in required_files(manifest.input_kind, manifest.backends)}
    files[ADAPTER] = sha256_bytes(blob)
    with_files = dataclasses.replace(manifest, files=files)
    (root / MANIFEST).write_text(with_files.to_json())
    return root
