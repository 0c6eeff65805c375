"""The model presets `flora-export` knows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from flora.edge.errors import FloraError


@dataclass(frozen=True)
class Preset:
    name: str
    architecture: str  # open_clip model name, or a name for `config`
    default_pretrained: Optional[str]  # open_clip pretrained tag; None: random-init only by default
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
    )
}


class UnknownPresetError(FloraError, ValueError):
    pass


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(f"{p.name} ({p.description})" for p in PRESETS.values())
        raise UnknownPresetError(f"unknown model {name!r}; presets: {known}") from None
