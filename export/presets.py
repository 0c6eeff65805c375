"""The models `flora-export` knows: any open_clip architecture, plus a few short aliases (presets)."""

from __future__ import annotations

import difflib
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from flora.edge.errors import FloraError


@dataclass(frozen=True)
class Preset:
    name: str
    architecture: str  # open_clip model name, or a name for `config`
    default_pretrained: Optional[str]  # open_clip pretrained tag; None: --pretrained or --random-init needed
    description: str
    config: Optional[Dict[str, Any]] = field(default=None)  # open_clip model config for custom sizes


# A CLIP with ViT-B/32's layout at toy size: 32 px images, two blocks per tower, width 64.
# It uses CLIP's real tokenizer (the vocabulary ships inside open_clip), so prompts are real.
# Random-init, so two choices keep its features informative: the image tower average-pools its
# patch tokens (a random ViT's class token is nearly the same for every image: mean cosine 0.995
# between digits, 0.94 pooled), and the logit scale starts at 100, a trained CLIP's temperature.
CLIP_TINY_CONFIG: Dict[str, Any] = {
    "embed_dim": 64,
    "init_logit_scale": math.log(100.0),
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32, "pool_type": "avg"},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

#: `default_pretrained` of the clip-proxy preset: the checkpoint `flora-proxy` pre-trains and caches
PROXY_TAG = "flora-proxy"

PRESETS: Dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "clip-vitb32",
            "ViT-B-32",
            "laion2b_s34b_b79k",
            "open_clip ViT-B/32, 224 px (LAION-2B weights by default)",
        ),
        Preset(
            "clip-vitb16",
            "ViT-B-16",
            "laion2b_s34b_b88k",
            "open_clip ViT-B/16, 224 px (LAION-2B weights by default)",
        ),
        Preset(
            "clip-tiny",
            "clip-tiny",
            None,
            "toy CLIP (2 blocks, width 64, 32 px), random-init: tests and the offline demo",
            CLIP_TINY_CONFIG,
        ),
        Preset(
            "clip-proxy",
            "clip-tiny",
            PROXY_TAG,
            "clip-tiny pre-trained offline on printed glyphs (flora-proxy): zero-shot above chance, the demo's model",
            CLIP_TINY_CONFIG,
        ),
    )
}


class UnknownPresetError(FloraError, ValueError):
    pass


def _config_folder() -> Optional[Path]:
    """open_clip's model_configs folder, found without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "model_configs"
        if folder.is_dir():
            return folder
    return None


def _natural(name: str) -> List[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def open_clip_models() -> List[str]:
    """open_clip's built-in architecture names, in its own (natural) order; none without open_clip."""
    folder = _config_folder()
    return sorted((p.stem for p in folder.glob("*.json")), key=_natural) if folder else []


def open_clip_architecture(name: str) -> Optional[str]:
    """`name` as open_clip spells it (`ViT-B/32` -> `ViT-B-32`), or None when open_clip has no such model."""
    cleaned = name.replace("/", "-")
    folder = _config_folder()
    return cleaned if folder is not None and (folder / f"{cleaned}.json").is_file() else None


def get_preset(name: str) -> Preset:
    """A preset by alias, or any open_clip architecture (e.g. `ViT-B-32`, `MobileCLIP-S1`)."""
    if name in PRESETS:
        return PRESETS[name]
    architecture = open_clip_architecture(name)
    if architecture is None:
        raise UnknownPresetError(unknown_model_message(name))
    return Preset(architecture, architecture, None, f"open_clip {architecture}")


def unknown_model_message(name: str) -> str:
    models = open_clip_models()
    close = difflib.get_close_matches(name.replace("/", "-"), [*PRESETS, *models], n=3, cutoff=0.6)
    aliases = ", ".join(f"{p.name} ({p.architecture})" for p in PRESETS.values())
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return (f"unknown model {name!r}{hint}\n  presets: {aliases}\n"
            f"  open_clip architectures ({len(models)}): {', '.join(models)}")
