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

from .lora import LoRAFactors


def tokenize_prompts(classes: Sequence[str], template: str, architecture: str) -> torch.Tensor:
    """Token ids (C x 77) of the class prompts, with CLIP's own tokenizer (shipped with open_clip)."""
    tokenizer = open_clip.get_tokenizer(architecture if architecture != "clip-tiny" else "ViT-B-32")
    return tokenizer([template.format(c) for c in classes])


class ClassEmbeddings(nn.Module):
    """L2-normalised text embeddings of the class prompts, through CLIP's (LoRA) text tower.

    The text tower is causal and the embedding is read at the end-of-text token, so tokens after
    the longest prompt's end-of-text token cannot influence any embedding: the context is cut to
    that length (9 tokens for "a photo of a dog." instead of 77). The token + position embeddings
    are constants (LoRA sits in the transformer blocks), so they are computed here once.
    """

    def __init__(self, model: CLIP, tokens: torch.Tensor) -> None:
        super().__init__()
        if getattr(model, "text_pool_type", "argmax") != "argmax":
            raise NotImplementedError(f"text pooling {model.text_pool_type!r} is not supported (argmax is)")
        eot = tokens.argmax(dim=-1)
        self.context = int(eot.max()) + 1
        with torch.no_grad():
            x0 = model.token_embedding(tokens[:, : self.context]) + model.positional_embedding[: self.context]
        self.register_buffer("x0", x0.detach().clone())
        self.register_buffer("attn_mask", model.attn_mask[: self.context, : self.context].clone())
        self.register_buffer("eot", eot.clone())
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection

    def forward(self) -> torch.Tensor:
        x = self.transformer(self.x0, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0]), self.eot]
        x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
        return F.normalize(x, dim=-1)


def full_context_embeddings(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's own normalised text embeddings over the full 77-token context (for checks)."""
    return model.encode_text(tokens, normalize=True)


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

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features, dim=-1)
        return self.logit_scale * f @ self.classes().t()


class PixelClassifier(nn.Module):
    """`vision`/`both` mode: pixels (N,3,H,W) -> logits (N,C).

    In `vision` mode the class embeddings are a frozen constant; in `both` they go through the
    LoRA text tower at every step.
    """

    def __init__(self, model: CLIP, tokens: torch.Tensor, text_trainable: bool) -> None:
        super().__init__()
        self.visual = model.visual
        self.register_buffer("logit_scale", model.logit_scale.detach().exp().clone())
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
        return self.logit_scale * f @ emb.t()


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
