"""`flora-export merge`: the federation's adapter merged back into open_clip's weights, or into one ONNX file.

A bundle holds the base weights' hash, not the weights, so a merge into a checkpoint rebuilds the
base model the bundle was exported from: random-init from its seed, a tag from open_clip's cache,
a file or snapshot folder from `--pretrained PATH` (checked against the sha256 the manifest
records). Every LoRA target's weight becomes W + scale B A (scale alpha/rank, or alpha with
--lora-scaling alpha), computed in float32 as the
bundle's graphs compute it; where B A is exactly zero (a zero adapter) W is kept bit for bit.

`--format onnx` needs no base weights: it joins the bundle's image encoder and inference model
into one graph, pixels -> logits, with the adapter's tensors as its initializers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from flora.edge import adapter as adapter_blob
from flora.edge.bundle import IMAGE_ENCODER, INFERENCE_MODEL, Manifest, load_bundle
from flora.edge.errors import FloraError
from flora.edge.fileio import atomic_write_bytes

from . import lora
from .loading import LoadedWeights, WeightsSource, folder_config, load_base, resolve_weights, state_sha256
from .presets import get_preset

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
CHECKPOINT_NAME = "open_clip_model.safetensors"
CONFIG_NAME = "open_clip_config.json"


class MergeError(FloraError, RuntimeError):
    """The merge cannot run with these inputs."""


@dataclass
class MergeResult:
    path: Path
    format: str  # "safetensors", "torch", "folder" or "onnx"
    changed: int  # weight tensors the adapter changed
    load_hint: str  # how to load the result


# -- the base weights the bundle was exported from ---------------------------------------------------
def base_source(manifest: Manifest, pretrained: Optional[str], cache_dir: Optional[str] = None,
                offline: bool = False) -> WeightsSource:
    """Where the bundle's base weights are to be found again, from the manifest's `pretrained` record."""
    record = manifest.pretrained
    source = record.get("source")
    preset = get_preset(manifest.preset)
    quick_gelu = bool(record.get("quick_gelu", False))
    if source == "random-init" and pretrained is None:
        return WeightsSource("random-init", None, None, quick_gelu, int(record.get("seed") or 0))
    if source == "open_clip-cache" and pretrained is None:
        return resolve_weights(preset, pretrained=record.get("tag"), random_init=False, cache_dir=cache_dir,
                               offline=offline, quick_gelu=quick_gelu)
    if pretrained is None:
        what = record.get("folder") or record.get("file") or "a local checkpoint"
        digest = record.get("file_sha256")
        raise MergeError(
            f"this bundle was exported from {what}" + (f" (sha256 {digest[:16]}…)" if digest else "")
            + ", which it does not hold: pass that checkpoint with --pretrained PATH"
        )
    return resolve_weights(preset, pretrained=pretrained, random_init=False, cache_dir=cache_dir, offline=offline,
                           quick_gelu=quick_gelu)


def rebuild_base(manifest: Manifest, pretrained: Optional[str] = None, cache_dir: Optional[str] = None,
                 offline: bool = False) -> Tuple[torch.nn.Module, LoadedWeights]:
    """The base model, checked against the manifest (file sha256 first, then the weights' own hash)."""
    weights = base_source(manifest, pretrained, cache_dir, offline)
    expected_file = manifest.pretrained.get("file_sha256")
    model, loaded = load_base(get_preset(manifest.preset), weights, expect_file_sha256=expected_file)
    have = state_sha256(model)
    if have != manifest.base_weights_sha256:
        raise MergeError(
            f"the base weights ({weights.kind}{', ' + weights.path.name if weights.path else ''}) are not those the "
            f"bundle was exported from: their hash is {have[:16]}…, the manifest's base_weights_sha256 is "
            f"{manifest.base_weights_sha256[:16]}…"
        )
    return model, loaded


# -- merging -------------------------------------------------------------------------------------------
def _block_prefixes(model: torch.nn.Module, tower: str) -> str:
    """The state-dict prefix of a tower's resblocks, e.g. `transformer.resblocks` or `text.transformer.resblocks`."""
    blocks = lora.tower_blocks(model, tower)
    for name, module in model.named_modules():
        if module is blocks:
            return name
    raise MergeError(f"cannot find the {tower} tower's blocks in the model")


def merged_state_dict(model: torch.nn.Module, spec: lora.LoraSpec,
                      tensors: Dict[str, np.ndarray]) -> Tuple[Dict[str, torch.Tensor], int]:
    """The base model's state dict with W + scale * B @ A in every LoRA target; (state, tensors changed)."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    scale = spec.scale
    changed = set()
    for tower in spec.towers:
        prefix = _block_prefixes(model, tower)
        blocks = lora.tower_blocks(model, tower)
        for i, block in enumerate(blocks):
            dim = block.attn.embed_dim
            for target in spec.ordered_targets:
                group = "attn" if target in (*lora.QKV, "out") else "mlp"
                base = f"{tower}.resblocks.{i}.{group}.{target}"
                a = torch.from_numpy(np.asarray(tensors[f"{base}.lora_A"], np.float32))
                b = torch.from_numpy(np.asarray(tensors[f"{base}.lora_B"], np.float32))
                delta = scale * (b @ a)  # as lora.LoRAWeight computes it
                key, rows = _weight_of(prefix, i, target, dim)
                weight = state[key]
                part = weight[rows] if rows is not None else weight
                merged = torch.where(delta == 0, part, part + delta.to(part.dtype))
                if not torch.equal(merged, part):
                    changed.add(key)
                if rows is not None:
                    weight[rows] = merged
                else:
                    state[key] = merged
    return state, len(changed)


def _weight_of(prefix: str, block: int, target: str, dim: int) -> Tuple[str, Optional[slice]]:
    """(state-dict key, row slice of the packed q/k/v weight or None) of a LoRA target."""
    if target in lora.QKV:
        k = lora.QKV.index(target)
        return f"{prefix}.{block}.attn.in_proj_weight", slice(k * dim, (k + 1) * dim)
    name = {"out": "attn.out_proj", "fc": "mlp.c_fc", "proj": "mlp.c_proj"}[target]
    return f"{prefix}.{block}.{name}.weight", None


def read_adapter(manifest: Manifest, path: Path) -> Tuple[Dict[str, np.ndarray], adapter_blob.AdapterMeta]:
    decoded = adapter_blob.load_file(path, manifest.trainable, model_id=manifest.model_id)
    return decoded.as_float32(), decoded.meta


def spec_of(manifest: Manifest) -> lora.LoraSpec:
    m = manifest.lora
    return lora.LoraSpec(m.tower, m.rank, m.alpha, tuple(m.targets), scaling=m.scaling, init=m.init)


def merge_checkpoint(bundle_dir: Path, adapter_path: Path, out: Path, pretrained: Optional[str] = None,
                     cache_dir: Optional[str] = None, offline: bool = False,
                     say: Callable[[str], None] = print) -> MergeResult:
    """Write open_clip weights with the adapter merged: `.safetensors`, a torch pickle (`.bin`, `.pt`,
    `.pth`) or, for any other `out`, a folder with open_clip_config.json (`local-dir:` loadable)."""
    bundle = load_bundle(bundle_dir, verify=False)
    manifest = bundle.manifest
    tensors, meta = read_adapter(manifest, adapter_path)
    if manifest.lora.variant == "ffa":  # FFA-LoRA: the adapter holds the B tensors, the bundle the frozen A's
        from flora.edge.ffa import frozen_factors

        tensors.update(frozen_factors(bundle))
    say(f"rebuilding the base model of {manifest.preset} ({manifest.pretrained.get('source')})")
    model, loaded = rebuild_base(manifest, pretrained, cache_dir, offline)
    state, changed = merged_state_dict(model, spec_of(manifest), tensors)
    metadata = {"format": "pt", "flora_model_id": manifest.model_id, "flora_adapter_round": str(meta.round),
                "flora_adapter_kind": meta.kind, "architecture": manifest.architecture,
                "quick_gelu": str(loaded.quick_gelu).lower()}
    if out.suffix == ".safetensors":
        _save_safetensors(state, out, metadata)
        fmt, target = "safetensors", out
    elif out.suffix in TORCH_SUFFIXES:
        _save_torch(state, out)
        fmt, target = "torch", out
    else:
        out.mkdir(parents=True, exist_ok=True)
        _save_safetensors(state, out / CHECKPOINT_NAME, metadata)
        config = {"model_cfg": _model_config(manifest, loaded), "preprocess_cfg": _preprocess_cfg(manifest)}
        atomic_write_bytes(out / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
        fmt, target = "folder", out
    hint = _load_hint(manifest, loaded, target, fmt)
    say(f"wrote {target}: {changed} weight tensors changed by the adapter (round {meta.round}); load it with\n"
        f"  {hint}")
    return MergeResult(target, fmt, changed, hint)


def _save_safetensors(state: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in state.items()}, metadata=metadata))


def _save_torch(state: Dict[str, torch.Tensor], path: Path) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _model_config(manifest: Manifest, loaded: LoadedWeights) -> Dict:
    import open_clip

    preset = get_preset(manifest.preset)
    own = folder_config(loaded.source.folder)
    if own is not None:
        cfg = dict(own["model_cfg"])
    elif preset.config is not None:
        cfg = json.loads(json.dumps(preset.config))
    else:
        cfg = open_clip.get_model_config(manifest.architecture)
    if loaded.quick_gelu:
        cfg["quick_gelu"] = True
    return cfg


def _preprocess_cfg(manifest: Manifest) -> Dict:
    p = manifest.preprocess
    return {"size": p.image_size, "mean": list(p.mean), "std": list(p.std), "interpolation": p.interpolation,
            "resize_mode": p.resize_mode}


def _load_hint(manifest: Manifest, loaded: LoadedWeights, target: Path, fmt: str) -> str:
    if fmt == "folder":
        return f"open_clip.create_model_and_transforms('local-dir:{target}')"
    quick = ", force_quick_gelu=True" if loaded.quick_gelu else ""
    return f"open_clip.create_model_and_transforms({manifest.architecture!r}, pretrained={str(target)!r}{quick})"


# -- one ONNX file -------------------------------------------------------------------------------------
def merge_onnx(bundle_dir: Path, adapter_path: Path, out: Path, say: Callable[[str], None] = print) -> MergeResult:
    """One inference graph, pixels (N,3,H,W) -> logits (N,C), with the adapter as initializers.

    The class names, preprocessing, model_id and adapter round go into the model's metadata_props.
    """
    import onnx
    from onnx import compose, numpy_helper

    from .onnx_export import save_model

    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    tensors, meta = read_adapter(manifest, adapter_path)
    classifier = onnx.load(str(bundle.path(INFERENCE_MODEL)))
    _bake_inputs(classifier, tensors, numpy_helper)
    if manifest.needs_image_encoder:
        encoder = onnx.load(str(bundle.path(IMAGE_ENCODER)))
        compose.add_prefix(encoder, "image_encoder/", rename_inputs=False, rename_outputs=False, inplace=True)
        compose.add_prefix(classifier, "classifier/", rename_inputs=False, rename_outputs=False, inplace=True)
        model = compose.merge_models(encoder, classifier, io_map=[("features", "features")],
                                     producer_name="flora-export merge")
    else:
        model = classifier
    props = {
        "flora.model_id": manifest.model_id,
        "flora.adapter_round": str(meta.round),
        "flora.classes": json.dumps(list(manifest.classes)),
        "flora.preprocess": json.dumps(_preprocess_cfg(manifest)),
        "flora.architecture": manifest.architecture,
    }
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    hint = f"onnxruntime.InferenceSession({str(out)!r}).run(None, {{'pixels': batch}})"
    say(f"wrote {out}: pixels -> logits over {manifest.num_classes} classes, adapter of round {meta.round} "
        f"baked in; classes and preprocessing are in its metadata_props")
    return MergeResult(out, "onnx", len(tensors), hint)


def _bake_inputs(model, tensors: Dict[str, np.ndarray], numpy_helper) -> None:
    """Turn the graph inputs named in `tensors` into initializers holding their values."""
    graph = model.graph
    kept = [i for i in graph.input if i.name not in tensors]
    missing = sorted(set(tensors) - {i.name for i in graph.input})
    if missing:
        raise MergeError(f"the inference model has no inputs {missing[:3]}")
    del graph.input[:]
    graph.input.extend(kept)
    for name, value in tensors.items():
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name))

