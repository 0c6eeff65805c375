"""bench/lora_vs_full.py's code paths on clip-tiny: full fine-tuning trains every weight under LoRA's loss,
the FLOPs read from the ONNX step graph agree with PyTorch's own count, the sgemm peak is a real figure."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench.full_finetune import FullClassifier, full_finetune_step, lora_step_flops  # noqa: E402
from bench.lora_vs_full import matmul_flops, sgemm_peak  # noqa: E402
from bench.step_worker import measure_full  # noqa: E402
from flora.edge.bundle import TRAIN_STEP_MODEL  # noqa: E402
from flora.export.graphs import PixelClassifier, tokenize_prompts  # noqa: E402
from flora.export.loading import WeightsSource, build_model  # noqa: E402
from flora.export.presets import get_preset  # noqa: E402

from .helpers import DIGITS  # noqa: E402


def _tiny():
    preset = get_preset("clip-tiny")
    model = build_model(preset, WeightsSource("random-init", None, None, False, 0))
    tokens = tokenize_prompts(list(DIGITS), "a photo of the number {}.", preset.architecture)
    size = preset.config["vision_cfg"]["image_size"]
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32))
    return model, tokens, pixels


def test_full_finetuning_has_loras_loss_and_updates_every_parameter():
    model, tokens, pixels = _tiny()
    with torch.no_grad():
        lora_logits = PixelClassifier(model, tokens, text_trainable=True)(pixels)
        full_logits = FullClassifier(model, tokens)(pixels)
    torch.testing.assert_close(full_logits, lora_logits, rtol=1e-5, atol=1e-5)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step, params = full_finetune_step(model, tokens, pixels, torch.tensor([0, 1, 2, 3]), lr=1e-3)
    assert sum(p.numel() for p in params) == sum(p.numel() for p in model.parameters()) > 1_000_000
    losses = [step() for _ in range(3)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p.detach(), before[name])]
    assert unchanged == [] and len(before) > 50


def test_step_graph_flops_agree_with_pytorchs_count(tiny_all_bundle):
    onnx32 = matmul_flops(tiny_all_bundle.path(TRAIN_STEP_MODEL), 32)
    onnx64 = matmul_flops(tiny_all_bundle.path(TRAIN_STEP_MODEL), 64)
    torch32 = lora_step_flops(str(tiny_all_bundle.root), "text", 32)
    assert onnx32["unknown"] == 0 and onnx32["matmul_nodes"] > 20
    assert abs(onnx32["flops"] - torch32) / torch32 < 0.02
    # only the logits (batch x dim x classes) and their gradient grow with the batch
    assert onnx64["flops"] - onnx32["flops"] == pytest.approx(2 * 2 * 32 * 64 * 10, rel=0.5)


def test_full_worker_and_sgemm_peak(tiny_all_bundle):
    r = measure_full(str(tiny_all_bundle.root), batch=2, warmup=0, steps=1, threads=1)
    assert r["params_trained"] == r["params_total"] > 1_000_000
    assert 0 < r["step_s"] < 30 and r["train_peak_mb"] > 100
    peak = sgemm_peak(1, (256,), 2)
    assert 0.1 < peak["peak_gflops"] < 10_000 and set(peak["gflops_by_size"]) == {"256"}
