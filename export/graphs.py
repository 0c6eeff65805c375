"""The torch modules that become the bundle's ONNX graphs.

CLIP's zero-shot head is the classifier: logits = logit_scale * cos(image feature, class text
embedding), with the class embeddings computed from prompts like "a photo of a {}.". In `text`
mode (FLORA's) the image tower is frozen and runs once per image on the device, so the training
graph takes image *features*; the class embeddings go through the LoRA text tower at every step.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from flora.edge.errors import ConfigError

from .lora import LoRAFactors, text_tower


def tokenize_prompts(classes: Sequence[str], template: str, architecture: str) -> torch.Tensor:
    """Token ids (C x 77) of the class prompts, with CLIP's own tokenizer (shipped with open_clip)."""
    tokenizer = open_clip.get_tokenizer(architecture if architecture != "clip-tiny" else "ViT-B-32")
    return tokenizer([template.format(c) for c in classes])


def _pooled_positions(tower: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The token each prompt's embedding is read at, by the tower's pool type (open_clip's text_global_pool)."""
    pool = getattr(tower, "pool_type", None) or getattr(tower, "text_pool_type", "argmax")
    if pool == "argmax":
        return tokens.argmax(dim=-1)
    if pool == "eos":
        eos = getattr(tower, "eos_id", None) or getattr(tower, "text_eos_id", None)
        return (tokens == eos).int().argmax(dim=-1)
    if pool == "first":
        return torch.zeros(tokens.shape[0], dtype=torch.long)
    if pool == "last":
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long)
    raise ConfigError(f"text pooling {pool!r} is not supported (argmax, eos, first and last are)")


class ClassEmbeddings(nn.Module):
    """L2-normalised text embeddings of the class prompts, through CLIP's (LoRA) text tower.

    A causal text tower reads each embedding at one token (CLIP's end-of-text token), so tokens
    after the last such position cannot influence any embedding: the context is cut to that length
    (9 tokens for "a photo of a dog." instead of 77). A bidirectional tower (MobileCLIP's) sees
    every position, padding included, and keeps the full context. The token + position embeddings
    are constants (LoRA sits in the transformer blocks), so they are computed here once.
    """

    def __init__(self, model: CLIP, tokens: torch.Tensor) -> None:
        super().__init__()
        tower = text_tower(model)
        if getattr(tower, "cls_emb", None) is not None:
            raise ConfigError("text towers with an appended class token (CoCa) are not supported")
        pooled = _pooled_positions(tower, tokens)
        causal_mask = getattr(tower, "attn_mask", None)
        pad_mask = bool(getattr(tower, "use_pad_mask", False))
        self.causal = causal_mask is not None
        self.context = int(pooled.max()) + 1 if self.causal and not pad_mask else int(tokens.shape[1])
        ctx = self.context
        with torch.no_grad():
            x0 = tower.token_embedding(tokens[:, :ctx]) + tower.positional_embedding[:ctx]
            mask = causal_mask[:ctx, :ctx].clone() if self.causal else None
            if pad_mask:
                additive = tower._build_additive_mask(tokens[:, :ctx], ctx, x0.dtype)
                mask = additive if mask is None else mask.unsqueeze(0) + additive
        self.register_buffer("x0", x0.detach().clone())
        self.register_buffer("attn_mask", mask)
        self.register_buffer("eot", pooled.clone())
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection

    def forward(self) -> torch.Tensor:
        x = self.transformer(self.x0, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0]), self.eot]
        if isinstance(self.text_projection, nn.Linear):
            x = self.text_projection(x)
        elif self.text_projection is not None:
            x = x @ self.text_projection
        return F.normalize(x, dim=-1)


def feature_dim(model: CLIP, image_size: int) -> int:
    """Width of the image tower's output (= the text embedding's)."""
    with torch.no_grad():
        return int(model.visual(torch.zeros(1, 3, image_size, image_size)).shape[-1])


def full_context_embeddings(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's own normalised text embeddings over the full 77-token context (for checks)."""
    return model.encode_text(tokens, normalize=True)


def _logit_bias(model: CLIP):
    """SigLIP-style models add a learnt bias to the logits; CLIP has none (None)."""
    bias = getattr(model, "logit_bias", None)
    return None if bias is None else bias.detach().clone()


class ImageEncoder(nn.Module):
    """Frozen image tower: pixels (N,3,H,W) -> open_clip's encode_image features (N,D), unnormalised."""

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.visual = model.visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)


class FeatureClassifier(nn.Module):
    """`text` mode: image features (N,D) -> logits (N,C) through the LoRA text tower."""

    def __init__(self, model: CLIP, tokens: torch.Tensor) -> None:
        super().__init__()
        self.classes = ClassEmbeddings(model, tokens)
        self.text_context = self.classes.context
        self.register_buffer("logit_scale", model.logit_scale.detach().exp().clone())
        self.register_buffer("logit_bias", _logit_bias(model))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features, dim=-1)
        logits = self.logit_scale * f @ self.classes().t()
        return logits if self.logit_bias is None else logits + self.logit_bias


class PixelClassifier(nn.Module):
    """`vision`/`both` mode: pixels (N,3,H,W) -> logits (N,C).

    In `vision` mode the class embeddings are a frozen constant; in `both` they go through the
    LoRA text tower at every step.
    """

    def __init__(self, model: CLIP, tokens: torch.Tensor, text_trainable: bool) -> None:
        super().__init__()
        self.visual = model.visual
        self.register_buffer("logit_scale", model.logit_scale.detach().exp().clone())
        self.register_buffer("logit_bias", _logit_bias(model))
        self.text_trainable = text_trainable
        classes = ClassEmbeddings(model, tokens)
        self.text_context = classes.context
        if text_trainable:
            self.classes = classes
        else:
            with torch.no_grad():
                self.register_buffer("class_embeddings", classes().clone())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        f = F.normalize(self.visual(pixels), dim=-1)
        emb = self.classes() if self.text_trainable else self.class_embeddings
        logits = self.logit_scale * f @ emb.t()
        return logits if self.logit_bias is None else logits + self.logit_bias


class WithAdapterInputs(nn.Module):
    """A classifier whose LoRA tensors are graph inputs (the bundle's inference model).

    Inputs after `x` are the adapter tensors in manifest order (A, B per LoRA target; B alone with
    `frozen_a`, FFA-LoRA, whose A stays a constant of the graph).
    """

    def __init__(self, classifier: nn.Module, factors: Dict[str, LoRAFactors], frozen_a: bool = False) -> None:
        super().__init__()
        self.classifier = classifier
        self.factors = list(factors.values())
        self.frozen_a = frozen_a

    def forward(self, x: torch.Tensor, *lora: torch.Tensor) -> torch.Tensor:
        for i, fac in enumerate(self.factors):
            fac.inputs = (fac.lora_A, lora[i]) if self.frozen_a else (lora[2 * i], lora[2 * i + 1])
        try:
            return self.classifier(x)
        finally:
            for fac in self.factors:
                fac.inputs = None


def build_classifier(model: CLIP, tokens: torch.Tensor, tower: str) -> Tuple[nn.Module, str]:
    """(the training-forward module, its input kind) for a LoRA tower mode."""
    if tower == "text":
        return FeatureClassifier(model, tokens), "features"
    return PixelClassifier(model, tokens, text_trainable=(tower == "both")), "pixels"
