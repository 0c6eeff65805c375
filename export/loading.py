"""Build an open_clip CLIP for a preset, with weights from a local file, open_clip's cache, or random init."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import open_clip
import torch
from open_clip import pretrained as oc_pretrained
from open_clip.model import CLIP

from flora.edge.errors import FloraError

from .presets import Preset

log = logging.getLogger(__name__)


class WeightsError(FloraError, RuntimeError):
    """Pretrained weights were asked for but cannot be found or loaded."""


@dataclass(frozen=True)
class WeightsSource:
    kind: str  # "file", "open_clip-cache" or "random-init"
    path: Optional[Path]
    tag: Optional[str]
    quick_gelu: bool
    seed: Optional[int] = None

    def describe(self) -> Dict[str, Any]:
        return {
            "source": self.kind,
            "tag": self.tag,
            "file": str(self.path) if self.path else None,
            "quick_gelu": self.quick_gelu,
            "seed": self.seed,
        }


def _hf_candidates(hf_hub: str) -> Tuple[str, List[str]]:
    """(repo id, filenames open_clip would try, in its order) for a pretrained cfg's `hf_hub` entry."""
    repo_id, filename = os.path.split(hf_hub)  # open_clip's own rule: a trailing '/' means the default name
    filename = filename or oc_pretrained.HF_WEIGHTS_NAME
    names = [*oc_pretrained._get_safe_alternatives(filename), filename]
    return repo_id, names


def _hf_cache_dir(cache_dir: Optional[str]) -> str:
    if cache_dir:
        return cache_dir
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_weights(
    preset: Preset,
    *,
    pretrained: Optional[str],
    random_init: bool,
    cache_dir: Optional[str] = None,
    offline: bool = False,
    quick_gelu: Optional[bool] = None,
    seed: int = 0,
) -> WeightsSource:
    """Decide where the base weights come from, without loading them.

    `pretrained` is a local checkpoint path or an open_clip tag (default: the preset's tag).
    A tag is looked up in open_clip's cache first; only without `offline` is a download tried.
    """
    if random_init:
        return WeightsSource("random-init", None, None, bool(quick_gelu), seed)
    if pretrained is None:
        pretrained = preset.default_pretrained
    if pretrained is None:
        return WeightsSource("random-init", None, None, bool(quick_gelu), seed)
    candidate = Path(pretrained).expanduser()
    if candidate.is_file():
        return WeightsSource("file", candidate.resolve(), None, bool(quick_gelu))
    if os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors")):
        raise WeightsError(f"pretrained checkpoint file {candidate} does not exist")
    if preset.config is not None:
        raise WeightsError(f"{preset.name} has no pretrained tags; pass --pretrained PATH or --random-init")
    cfg = open_clip.get_pretrained_cfg(preset.architecture, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(preset.architecture)
        raise WeightsError(f"unknown open_clip tag {pretrained!r} for {preset.architecture}; known tags: {tags}")
    tag_quick_gelu = bool(cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
    path = _find_cached(cfg, cache_dir)
    if path is None and not offline:
        log.info("weights for %s/%s are not cached; downloading through open_clip", preset.architecture, pretrained)
        try:
            path = Path(oc_pretrained.download_pretrained(cfg, cache_dir=cache_dir))
        except Exception as exc:  # network errors come in many types
            log.warning("download failed: %s", exc)
            path = None
    if path is None or not path.is_file():
        raise WeightsError(_missing_weights_message(preset, pretrained, cfg, cache_dir, offline))
    return WeightsSource("open_clip-cache", path, pretrained, tag_quick_gelu)


def _find_cached(cfg: Dict[str, Any], cache_dir: Optional[str]) -> Optional[Path]:
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        from huggingface_hub import hf_hub_download

        repo_id, names = _hf_candidates(hf_hub)
        for name in names:
            try:
                return Path(hf_hub_download(repo_id, name, cache_dir=cache_dir, local_files_only=True))
            except Exception:  # LocalEntryNotFoundError and friends: not cached
                continue
    url = cfg.get("url", "")
    if url:
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if target.is_file():
            return target
    return None


def _missing_weights_message(
    preset: Preset, tag: str, cfg: Dict[str, Any], cache_dir: Optional[str], offline: bool
) -> str:
    looked = []
    if cfg.get("hf_hub"):
        repo_id, names = _hf_candidates(cfg["hf_hub"])
        looked.append(f"Hugging Face cache {_hf_cache_dir(cache_dir)}: {repo_id}/{' or '.join(names)}")
    if cfg.get("url"):
        looked.append(f"{Path(cache_dir or '~/.cache/clip') / os.path.basename(cfg['url'])}")
    how = "offline mode, no download tried" if offline else "a download was tried and failed"
    return (
        f"pretrained weights for {preset.name} ({preset.architecture}, tag {tag!r}) are not available ({how}).\n"
        f"  looked for: {'; '.join(looked)}\n"
        "  provide them with --pretrained PATH (an open_clip checkpoint: .safetensors, .bin or .pt), or run once\n"
        "  with internet access to fill open_clip's cache (--cache-dir to choose it), or use --random-init"
    )


def build_model(preset: Preset, weights: WeightsSource) -> CLIP:
    """The open_clip model in eval mode, every parameter frozen."""
    if weights.kind == "random-init":
        torch.manual_seed(weights.seed or 0)
    if preset.config is not None:
        cfg = dict(preset.config)
        if weights.quick_gelu:
            cfg["quick_gelu"] = True
        model = CLIP(**cfg)
        if weights.path is not None:
            _load_state(model, weights.path)
    else:
        try:
            model = open_clip.create_model(
                preset.architecture,
                pretrained=str(weights.path) if weights.path else None,
                force_quick_gelu=weights.quick_gelu,
                pretrained_text=False,
            )
        except Exception as exc:
            if weights.path is None:
                raise
            raise WeightsError(f"cannot load {weights.path} into {preset.architecture}: {exc}") from exc
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_state(model: CLIP, path: Path) -> None:
    try:
        from open_clip.factory import load_checkpoint

        load_checkpoint(model, str(path), strict=True)
    except Exception as exc:
        raise WeightsError(f"cannot load {path} into the model: {exc}") from exc


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's tensors (name, dtype, shape, bytes) in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()


def preprocess_config(model: CLIP, weights: WeightsSource, preset: Preset) -> Dict[str, Any]:
    """Image size, mean/std and resize rule of open_clip's eval transform for this model."""
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    interpolation, resize_mode = "bicubic", "shortest"
    if weights.tag and preset.config is None:
        cfg = open_clip.get_pretrained_cfg(preset.architecture, weights.tag)
        mean = cfg.get("mean", mean)
        std = cfg.get("std", std)
        interpolation = cfg.get("interpolation", interpolation)
        resize_mode = cfg.get("resize_mode", resize_mode)
    return {
        "image_size": size,
        "mean": [float(x) for x in mean],
        "std": [float(x) for x in std],
        "interpolation": interpolation,
        "resize_mode": resize_mode,
    }
