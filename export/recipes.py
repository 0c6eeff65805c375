"""Training recipes: named sets of export and round settings (`flora-export --recipe`, `flora-sim --recipe`).

`flora` is the recipe of FLORA's authors' code (dphuongn/FLoRA, clientlora.py): LoRA only on the text
encoder's attention out_proj, rank 2, the update scaled by alpha = 32 itself (not alpha/rank), A drawn
from N(0, 1)/sqrt(rank) and B zero; torch.optim.Adam (L2 weight decay 0.2 added to the gradient, not
AdamW's decoupled decay), lr 5e-5, betas (0.9, 0.98), eps 1e-6; batch 128, 1 local epoch, the Adam
state kept across rounds, and CLIP's symmetric image-text contrastive loss. `default` is this project's
own: rank 8 on q, k, v and out, alpha/rank, AdamW, cross-entropy over the class-prompt head.

Explicit options override a recipe's values; the manifest records the recipe, its settings and
which of them were overridden. No torch here (the CLIs apply recipes before anything heavy loads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Dict, Mapping

from flora.edge.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    #: ExportOptions field -> value
    export: Mapping[str, Any]
    #: the round's settings (what an aggregator sends in its round message): epochs, batch_size, lr, reset_optimizer
    training: Mapping[str, Any]


FLORA = Recipe(
    "flora",
    "FLORA's authors' recipe: text out_proj LoRA, rank 2, scale alpha=32, A~N(0,1)/sqrt(r); Adam (L2 decay 0.2) "
    "lr 5e-5, betas (0.9, 0.98), eps 1e-6; batch 128, 1 epoch; contrastive loss",
    export={
        "tower": "text", "targets": ("out",), "rank": 2, "alpha": 32.0, "lora_scaling": "alpha",
        "lora_init": "gaussian", "lora_variant": "lora", "optimizer": "adam", "betas": (0.9, 0.98), "eps": 1e-6,
        "weight_decay": 0.2, "loss": "contrastive", "backends": ("step",),
    },
    training={"epochs": 1, "batch_size": 128, "lr": 5e-5, "reset_optimizer": False},
)

DEFAULT = Recipe(
    "default",
    "this project's: rank 8 on q,k,v,out, scale alpha/rank (16/8), Kaiming A; AdamW; cross-entropy over the "
    "class-prompt head",
    export={
        "tower": "text", "targets": ("q", "k", "v", "out"), "rank": 8, "alpha": 16.0, "lora_scaling": "alpha/rank",
        "lora_init": "kaiming", "lora_variant": "lora", "optimizer": "adamw", "betas": (0.9, 0.999), "eps": 1e-8,
        "weight_decay": 0.0, "loss": "ce", "backends": ("ort-training", "step"),
    },
    training={"epochs": 5, "batch_size": 32, "lr": 1e-3, "reset_optimizer": False},
)

RECIPES: Dict[str, Recipe] = {r.name: r for r in (DEFAULT, FLORA)}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}") from None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def recipe_record(recipe: Recipe, overridden: Collection[str]) -> Dict[str, Any]:
    """What the manifest's `recipe` holds: the name, the recipe's own settings, and the keys an explicit
    option replaced (the values used are the manifest's own lora/optimizer/loss/backends)."""
    return {"name": recipe.name,
            "settings": {k: _plain(v) for k, v in sorted(recipe.export.items())},
            "training": {k: _plain(v) for k, v in sorted(recipe.training.items())},
            "overridden": sorted(set(overridden) & (set(recipe.export) | set(recipe.training)))}


def export_settings(name: str, given: Mapping[str, Any], training_given: Mapping[str, Any] = {}) -> Dict[str, Any]:
    """ExportOptions keyword arguments: the recipe's export settings, with `given` (explicit options, by
    ExportOptions field) on top, and the `recipe` record (`training_given`: explicit round settings)."""
    recipe = get_recipe(name)
    settings = dict(recipe.export)
    settings.update(given)
    both = {**recipe.export, **recipe.training}
    overridden = [k for k, v in {**given, **training_given}.items() if k in both and _plain(v) != _plain(both[k])]
    settings["recipe"] = recipe_record(recipe, overridden)
    return settings
