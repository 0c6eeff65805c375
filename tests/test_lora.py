"""LoRA injection into open_clip: exact with B = 0, the right delta otherwise, only LoRA trainable."""

from __future__ import annotations

import re

import pytest
import torch

from flora.edge.errors import ConfigError
from flora.export.graphs import ClassEmbeddings, full_context_embeddings, tokenize_prompts
from flora.export.loading import WeightsSource, build_model
from flora.export.lora import LoraSpec, attach_lora, fused_attention
from flora.export.presets import get_preset

from .helpers import DIGITS


def tiny_model(seed: int = 0):
    return build_model(get_preset("clip-tiny"), WeightsSource("random-init", None, None, False, seed))


@pytest.mark.parametrize("tower", ["text", "vision", "both"])
def test_zero_b_leaves_clip_outputs_bit_identical(tower):
    model = tiny_model()
    tokens = tokenize_prompts(DIGITS, "a photo of a {}.", "clip-tiny")
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        img0, txt0 = model.encode_image(pixels), model.encode_text(tokens)
    params = attach_lora(model, LoraSpec(tower, rank=4, alpha=8, targets=("q", "k", "v", "out", "fc", "proj")))
    assert all(float(p.abs().sum()) == 0 for n, p in params.items() if n.endswith("lora_B"))
    assert any(float(p.abs().sum()) > 0 for n, p in params.items() if n.endswith("lora_A"))
    with torch.no_grad():
        img1, txt1 = model.encode_image(pixels), model.encode_text(tokens)
    assert torch.equal(img0, img1)
    assert torch.equal(txt0, txt1)


def test_nonzero_b_adds_scaled_low_rank_delta_to_fused_qkv_and_out_proj():
    model = tiny_model()
    block = model.transformer.resblocks[1]
    w_in = block.attn.in_proj_weight.detach().clone()
    w_out = block.attn.out_proj.weight.detach().clone()
    spec = LoraSpec("text", rank=2, alpha=6.0, targets=("k", "out"))
    params = attach_lora(model, spec)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=gen))
    a_k, b_k = params["text.resblocks.1.attn.k.lora_A"], params["text.resblocks.1.attn.k.lora_B"]
    a_o, b_o = params["text.resblocks.1.attn.out.lora_A"], params["text.resblocks.1.attn.out.lora_B"]
    d = w_in.shape[1]
    expected_in = w_in.clone()
    expected_in[d : 2 * d] += spec.scale * (b_k @ a_k)
    with torch.no_grad():
        # what MultiheadAttention reads is the parametrized weight: q and v rows untouched, k shifted
        torch.testing.assert_close(block.attn.in_proj_weight, expected_in, rtol=0, atol=1e-6)
        torch.testing.assert_close(block.attn.out_proj.weight, w_out + spec.scale * (b_o @ a_o), rtol=0, atol=1e-6)
        # and the attention output really uses it: compare against a hand-built MHA forward
        x = torch.randn(2, 5, d)
        got = block.attn(x, x, x, need_weights=False)[0]
        ref = torch.nn.functional.multi_head_attention_forward(
            x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), d, block.attn.num_heads,
            expected_in, block.attn.in_proj_bias, None, None, False, 0.0,
            w_out + spec.scale * (b_o @ a_o), block.attn.out_proj.bias, training=False, need_weights=False,
        )[0].transpose(0, 1)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


class FusedLookAlike(torch.nn.Module):
    """Not an nn.MultiheadAttention: its fused layout (in_proj_weight, out_proj), its own forward."""

    def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj
        self.num_heads = mha.num_heads

    def forward(self, q, k, v, need_weights=False, attn_mask=None):
        out = torch.nn.functional.multi_head_attention_forward(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), q.shape[-1], self.num_heads,
            self.in_proj_weight, self.in_proj_bias, None, None, False, 0.0, self.out_proj.weight, self.out_proj.bias,
            training=self.training, need_weights=False, attn_mask=attn_mask,
        )[0]
        return out.transpose(0, 1), None


class SeparateQKV(torch.nn.Module):
    """Attention with q, k and v in one Linear layer (the layout newer open_clip versions use)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)


def test_attention_is_recognised_by_its_fused_layout_not_its_class():
    model = tiny_model()
    tokens = tokenize_prompts(DIGITS, "a photo of a {}.", "clip-tiny")
    with torch.no_grad():
        before = model.encode_text(tokens)
    for block in model.transformer.resblocks:
        block.attn = FusedLookAlike(block.attn)
    params = attach_lora(model, LoraSpec("text", rank=2, alpha=4, targets=("q", "v", "out")))
    assert len(params) == 2 * 3 * 2  # blocks x targets x (A, B)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), before, rtol=1e-5, atol=1e-5)  # B = 0: unchanged
        for name, p in params.items():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
        assert float((model.encode_text(tokens) - before).abs().max()) > 1e-3  # the look-alike reads the LoRA weight
    width = before.shape[1]
    assert fused_attention(torch.nn.MultiheadAttention(width, 2))
    assert not fused_attention(torch.nn.MultiheadAttention(width, 2, kdim=8, vdim=8))  # separate q/k/v weights
    assert not fused_attention(SeparateQKV(width)) and not fused_attention(None)
    other = tiny_model()
    other.transformer.resblocks[1].attn = SeparateQKV(other.transformer.width)
    with pytest.raises(ConfigError, match=r"text block 1's attention \(SeparateQKV\) has no fused .* "
                                                  r"install open_clip_torch<4"):
        attach_lora(other, LoraSpec("text", rank=2, alpha=4, targets=("q",)))


def test_only_lora_tensors_require_grad_and_names_follow_the_manifest_order():
    model = tiny_model()
    params = attach_lora(model, LoraSpec("both", rank=2, alpha=4, targets=("v", "q", "fc")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(params) == 2 * 2 * 2 * 3  # towers x blocks x (A,B) x targets
    names = list(params)
    assert names[:6] == [
        "text.resblocks.0.attn.q.lora_A", "text.resblocks.0.attn.q.lora_B",
        "text.resblocks.0.attn.v.lora_A", "text.resblocks.0.attn.v.lora_B",
        "text.resblocks.0.mlp.fc.lora_A", "text.resblocks.0.mlp.fc.lora_B",
    ]
    assert names[-1] == "vision.resblocks.1.mlp.fc.lora_B"
    assert tuple(params["vision.resblocks.0.mlp.fc.lora_B"].shape) == (256, 2)
    assert tuple(params["vision.resblocks.0.mlp.fc.lora_A"].shape) == (2, 64)


def test_truncated_context_equals_full_77_token_embeddings():
    model = tiny_model()
    attach_lora(model, LoraSpec("text", rank=4, alpha=8))
    with torch.no_grad():
        for p in model.parameters():  # make LoRA non-trivial so the check covers it too
            if p.requires_grad:
                p.normal_(0, 0.05)
    tokens = tokenize_prompts([*DIGITS, "a much longer class name with many words"], "a photo of a {}.", "clip-tiny")
    truncated = ClassEmbeddings(model, tokens)
    assert truncated.context < 20 < tokens.shape[1]
    with torch.no_grad():
        torch.testing.assert_close(truncated(), full_context_embeddings(model, tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (dict(rank=0), "LoRA rank must be >= 1, got 0"),
        (dict(rank=-3), "LoRA rank must be >= 1, got -3"),
        (dict(alpha=0.0), "LoRA alpha must be > 0, got 0.0"),
        (dict(alpha=float("nan")), "LoRA alpha must be > 0, got nan"),
        (dict(targets=("q", "x")), "LoRA targets ['q', 'x'] (unknown: 'x') must be a non-empty subset"),
        (dict(targets=()), "LoRA targets [] must be a non-empty subset"),
        (dict(targets=("q", "q")), "LoRA targets ['q', 'q'] repeat an entry"),
        (dict(tower="audio"), "LoRA tower must be text, vision or both, not 'audio'"),
    ],
)
def test_bad_lora_config_is_refused_naming_the_bad_value(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LoraSpec(**{"tower": "text", **bad})
