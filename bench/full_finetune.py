"""Full fine-tuning of CLIP in PyTorch, the baseline LoRA is measured against (bench/lora_vs_full.py).

Every parameter of both towers trains (token and position embeddings, logit scale included) with AdamW, under
the loss the LoRA trainers use: cross-entropy over the class prompts' logits (logit_scale x cosine of the image
feature and each class's text embedding). The class prompts go through the text tower at every step, cut to the
causal context the LoRA graphs use (flora.export.graphs.ClassEmbeddings), so the two differ only in what trains.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from flora.export.graphs import ClassEmbeddings
from flora.export.lora import text_tower


class TrainableClassEmbeddings(ClassEmbeddings):
    """ClassEmbeddings whose token and position embeddings train (LoRA's version keeps them constant)."""

    def __init__(self, model: CLIP, tokens: torch.Tensor) -> None:
        super().__init__(model, tokens)
        tower = text_tower(model)
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.register_buffer("tokens", tokens[:, : self.context].clone())

    def forward(self) -> torch.Tensor:
        x = self.token_embedding(self.tokens) + self.positional_embedding[: self.context]
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        x = x[torch.arange(x.shape[0]), self.eot]
        if isinstance(self.text_projection, nn.Linear):
            x = self.text_projection(x)
        elif self.text_projection is not None:
            x = x @ self.text_projection
        return F.normalize(x, dim=-1)


class FullClassifier(nn.Module):
    """pixels (N,3,H,W) -> logits (N,C), every CLIP weight trainable."""

    def __init__(self, model: CLIP, tokens: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.classes = TrainableClassEmbeddings(model, tokens)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        f = F.normalize(self.model.visual(pixels), dim=-1)
        logits = self.model.logit_scale.exp() * f @ self.classes().t()
        bias = getattr(self.model, "logit_bias", None)
        return logits if bias is None else logits + bias


def full_finetune_step(model: CLIP, tokens: torch.Tensor, pixels: torch.Tensor, labels: torch.Tensor,
                       lr: float = 1e-4) -> Tuple[Callable[[], float], List[nn.Parameter]]:
    """(one AdamW step over every parameter of `model` on this batch -> its loss, the parameters it trains)."""
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    classifier = FullClassifier(model, tokens).train()
    opt = torch.optim.AdamW(params, lr=lr, eps=1e-8, weight_decay=0.0)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(classifier(pixels), labels)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step, params


def lora_step_flops(bundle_dir: str, tower: str, batch: int) -> int:
    """FLOPs of one LoRA training step's forward and backward in PyTorch (torch.utils.flop_counter), for the
    bundle's model, classes and LoRA spec: a cross-check of the count read from the ONNX step graph."""
    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    from flora.edge.bundle import load_bundle
    from flora.export.graphs import build_classifier, tokenize_prompts
    from flora.export.loading import WeightsSource, build_model
    from flora.export.lora import LoraSpec, attach_lora
    from flora.export.presets import get_preset

    m = load_bundle(bundle_dir, verify=False).manifest
    preset = get_preset(m.preset)
    model = build_model(preset, WeightsSource("random-init", None, None, False, 0))
    attach_lora(model, LoraSpec(m.lora.tower, m.lora.rank, m.lora.alpha, m.lora.targets))
    classifier, _ = build_classifier(model, tokenize_prompts(list(m.classes), m.prompt_template,
                                                             preset.architecture), tower)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(m.input_shape(batch)).astype(np.float32))
    y = torch.zeros(batch, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(classifier(x), y).backward()
    return int(counter.get_total_flops())
