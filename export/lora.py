"""LoRA for open_clip's transformer blocks, as weight parametrizations.

open_clip's attention is `nn.MultiheadAttention`, which keeps q, k and v in one fused
`in_proj_weight` and reads `out_proj.weight` directly inside `F.multi_head_attention_forward`, so a
module wrapped around `out_proj` would never be called. A parametrization
(`torch.nn.utils.parametrize`) replaces the *weight tensor* itself: every read of
`attn.in_proj_weight` or `attn.out_proj.weight` yields `W + (alpha/r) * B @ A`, for whatever code
reads it. With B = 0 the weight is W exactly, so the model is unchanged bit for bit, and open_clip's
own forward runs untouched (it also still sees `mlp.c_fc.weight`, whose dtype it reads).

Two variants. `lora` (the default, FLORA's): A and B both trained and sent. `ffa` (FFA-LoRA, Sun et
al., ICLR 2024): A is drawn once from a seeded generator, N(0, 1/in) (rows of unit expected norm, so
A x keeps the scale of x), and frozen: it is a constant of every graph and of the bundle, and only
B is trained, sent and averaged. The weight change scale * B @ A is then linear in B: FedAvg of the B
tensors is the exact average of the weight changes, and clipping a device's change of B to C bounds
the change of the weights by C * scale * max ||A||_2, exactly (edge/ffa.py).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from open_clip.transformer import TextTransformer
from torch import nn
from torch.nn.utils import parametrize

from flora.edge.errors import ConfigError

from .options import QKV, LoraSpec  # the layout, checked without torch


class LoRAFactors(nn.Module):
    """The low-rank pair of one weight: A (rank x in), B (out x rank); the delta is B @ A."""

    def __init__(self, out_features: int, in_features: int, rank: int) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        #: (A, B) tensors that replace the parameters while set: graph inputs of the inference model
        self.inputs: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def reset(self, generator: torch.Generator) -> None:
        """PEFT's initialisation: A like nn.Linear's weight (Kaiming-uniform), B zero."""
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])  # kaiming_uniform_(a=sqrt(5)) bound
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
            self.lora_B.zero_()

    def reset_gaussian(self, generator: torch.Generator) -> None:
        """FLORA's authors' initialisation: A ~ N(0, 1)/sqrt(rank), B zero."""
        with torch.no_grad():
            self.lora_A.normal_(0.0, 1.0 / math.sqrt(self.lora_A.shape[0]), generator=generator)
            self.lora_B.zero_()

    def freeze_a(self, generator: torch.Generator) -> None:
        """FFA-LoRA: A ~ N(0, 1/in), frozen (no gradient: a constant of the exported graphs); B zero."""
        with torch.no_grad():
            self.lora_A.normal_(0.0, 1.0 / math.sqrt(self.lora_A.shape[1]), generator=generator)
            self.lora_B.zero_()
        self.lora_A.requires_grad_(False)

    def delta(self) -> torch.Tensor:
        a, b = self.inputs if self.inputs is not None else (self.lora_A, self.lora_B)
        return b @ a


class LoRAWeight(nn.Module):
    """Parametrization W -> W + scale * B @ A of a plain (out x in) weight."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.factors = LoRAFactors(out_features, in_features, rank)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * self.factors.delta()


class FusedQKVLoRA(nn.Module):
    """Parametrization of MultiheadAttention's fused (3d x d) in_proj_weight: LoRA on chosen q/k/v rows."""

    def __init__(self, dim: int, rank: int, scale: float, parts: Sequence[str]) -> None:
        super().__init__()
        self.dim = dim
        self.scale = scale
        self.parts = tuple(p for p in QKV if p in parts)
        self.factors = nn.ModuleDict({p: LoRAFactors(dim, dim, rank) for p in self.parts})

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        blocks = []
        for p in QKV:
            if p in self.factors:
                blocks.append(self.factors[p].delta())
            else:
                blocks.append(weight.new_zeros(self.dim, self.dim))
        return weight + self.scale * torch.cat(blocks, dim=0)


def fused_attention(module: object) -> bool:
    """Whether `module` is attention the LoRA parametrizations fit: q, k and v in one (3d x d)
    `in_proj_weight` and an `out_proj` linear layer, as nn.MultiheadAttention keeps them (checked by
    what it has, not its class: a subclass or a look-alike works, a module with separate q/k/v does not)."""
    weight = getattr(module, "in_proj_weight", None)
    return (isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.shape[0] == 3 * weight.shape[1]
            and isinstance(getattr(module, "out_proj", None), nn.Linear))


def text_tower(model: nn.Module) -> nn.Module:
    """The module that holds the text transformer's parts: CLIP itself, or CustomTextCLIP's `text`
    (MobileCLIP, SigLIP-style models) when that is open_clip's TextTransformer."""
    text = getattr(model, "text", None)
    if text is None:
        return model
    if not isinstance(text, TextTransformer):
        raise ConfigError(
            f"the text tower is {type(text).__name__}; LoRA and the class-embedding graph support open_clip's "
            "own TextTransformer (CLIP, MobileCLIP, ...), not Hugging Face text encoders"
        )
    return text


def tower_blocks(model: nn.Module, tower: str) -> nn.ModuleList:
    """The residual attention blocks of CLIP's text or vision transformer."""
    if tower == "text":
        transformer = text_tower(model).transformer
    else:
        transformer = getattr(model.visual, "transformer", None)
        if transformer is None:
            raise ConfigError(
                f"the image tower is {type(model.visual).__name__} (not a ViT): LoRA in it is not supported; "
                "use --lora-tower text (FLORA's default: the image tower stays frozen)"
            )
    blocks = transformer.resblocks
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not fused_attention(attn):
            raise ConfigError(
                f"{tower} block {i}'s attention ({type(attn).__name__}) has no fused (3d x d) in_proj_weight and "
                "out_proj linear layer, which LoRA injection wraps (open_clip's nn.MultiheadAttention has them; "
                "newer open_clip versions replace it: install open_clip_torch<4)"
            )
    return blocks


def attach_lora(model: nn.Module, spec: LoraSpec, seed: int = 0) -> OrderedDict[str, nn.Parameter]:
    """Add LoRA parametrizations to `model` in place; return {adapter tensor name: parameter}.

    Names read `<tower>.resblocks.<i>.<attn|mlp>.<target>.lora_<A|B>` and come in a fixed order
    (tower, block, target, A before B): the manifest's trainable list. Only these require grad.
    For the `ffa` variant only the B tensors are returned (and trainable); `frozen_factors` gives the A's.
    """
    generator = torch.Generator().manual_seed(seed)
    params: OrderedDict[str, nn.Parameter] = OrderedDict()
    for tower in spec.towers:
        for i, block in enumerate(tower_blocks(model, tower)):
            attn = block.attn
            dim = attn.in_proj_weight.shape[1]
            prefix = f"{tower}.resblocks.{i}"
            factors: List[Tuple[str, LoRAFactors]] = []
            qkv = [t for t in QKV if t in spec.targets]
            if qkv:
                param = FusedQKVLoRA(dim, spec.rank, spec.scale, qkv)
                parametrize.register_parametrization(attn, "in_proj_weight", param)
                factors += [(f"{prefix}.attn.{t}", param.factors[t]) for t in qkv]
            layers = {"out": ("attn", attn.out_proj), "fc": ("mlp", block.mlp.c_fc), "proj": ("mlp", block.mlp.c_proj)}
            for target in ("out", "fc", "proj"):
                if target not in spec.targets:
                    continue
                group, linear = layers[target]
                out_f, in_f = linear.weight.shape
                param = LoRAWeight(out_f, in_f, spec.rank, spec.scale)
                parametrize.register_parametrization(linear, "weight", param)
                factors.append((f"{prefix}.{group}.{target}", param.factors))
            order = {t: k for k, t in enumerate(spec.ordered_targets)}
            for name, fac in sorted(factors, key=lambda nf: order[nf[0].rsplit(".", 1)[1]]):
                if spec.variant == "ffa":
                    fac.freeze_a(generator)
                else:
                    fac.reset_gaussian(generator) if spec.init == "gaussian" else fac.reset(generator)
                    params[f"{name}.lora_A"] = fac.lora_A
                params[f"{name}.lora_B"] = fac.lora_B
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    return params


def frozen_factors(root: nn.Module, lora: Dict[str, nn.Parameter]) -> OrderedDict[str, torch.Tensor]:
    """{`<name>.lora_A`: A} of the LoRA factors whose A is not among the adapter's tensors (FFA-LoRA), in
    adapter order; empty for the plain variant."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for base, fac in factors_by_name(root, lora).items():
        if f"{base}.lora_A" not in lora:
            out[f"{base}.lora_A"] = fac.lora_A.detach().clone()
    return out


def module_names(root: nn.Module, lora: Dict[str, nn.Parameter]) -> Dict[str, str]:
    """{parameter name under `root` (as ONNX export names initializers): adapter tensor name}."""
    by_id = {id(p): name for name, p in lora.items()}
    found = {name: by_id[id(p)] for name, p in root.named_parameters() if id(p) in by_id}
    missing = set(lora) - set(found.values())
    if missing:
        raise RuntimeError(f"LoRA tensors not reachable from the exported module: {sorted(missing)[:3]}")
    return found


def load_lora_(lora: Dict[str, nn.Parameter], tensors: Dict[str, torch.Tensor]) -> None:
    """Copy tensors (e.g. from an adapter blob) into the LoRA parameters in place."""
    with torch.no_grad():
        for name, p in lora.items():
            p.copy_(torch.as_tensor(tensors[name], dtype=p.dtype))
def factors_by_name(root: nn.Module, lora: Dict[str, nn.Parameter]) -> OrderedDict[str, LoRAFactors]:
    """{adapter base name (without .lora_A/.lora_B): its LoRAFactors module}, in adapter order."""
    by_param = {id(t): m for m in root.modules() if isinstance(m, LoRAFactors) for t in (m.lora_A, m.lora_B)}
    out: OrderedDict[str, LoRAFactors] = OrderedDict()
    for name, p in lora.items():
        base = name.rsplit(".", 1)[0]
        if base not in out:
            out[base] = by_param[id(p)]
    return out
