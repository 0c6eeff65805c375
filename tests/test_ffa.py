"""FFA-LoRA (`--lora-variant ffa`): A drawn from the seed and frozen in the graphs and the bundle, only B
trained and sent, by both trainer backends as by PyTorch; the update is linear in B, so clipping B bounds
the change of the weights exactly (and plain LoRA's does not)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flora.edge import dp, ffa
from flora.edge.adapter import load_file
from flora.edge.bundle import ADAPTER, FROZEN_FACTORS, INFERENCE_MODEL, BundleError
from flora.edge.evaluate import AdapterEvaluator
from flora.edge.ort import inference_session
from flora.edge.trainers import open_trainer
from flora.export.graphs import FeatureClassifier, tokenize_prompts
from flora.export.loading import WeightsSource, build_model
from flora.export.lora import LoraSpec, attach_lora, factors_by_name, load_lora_
from flora.export.pipeline import lora_identity
from flora.export.presets import get_preset

from .helpers import DIGITS, assert_same_adapter, batches, export_tiny, run_backend


@pytest.fixture(scope="module")
def ffa_bundle(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("ffa") / "bundle", backends=("ort-training", "step"),
                       lora_variant="ffa")


def _torch_ffa(seed=0):
    model = build_model(get_preset("clip-tiny"), WeightsSource("random-init", None, None, False, 0))
    params = attach_lora(model, LoraSpec("text", rank=8, alpha=16.0, variant="ffa"), seed=seed)
    return model, params


def test_only_b_is_trainable_and_the_frozen_a_is_in_the_bundle(ffa_bundle):
    m = ffa_bundle.manifest
    assert m.lora.variant == "ffa" and m.lora.frozen_seed == 0
    assert m.trainable_names and all(n.endswith(".lora_B") for n in m.trainable_names)
    frozen = ffa.frozen_factors(ffa_bundle)
    assert sorted(frozen) == sorted(n[: -len("lora_B")] + "lora_A" for n in m.trainable_names)
    assert FROZEN_FACTORS in m.files
    for name, a in frozen.items():
        assert a.shape == (8, 64)
        assert abs(a.std() * math.sqrt(64) - 1) < 0.1, name  # N(0, 1/in): rows of unit expected norm
    initial = load_file(ffa_bundle.path(ADAPTER), m.trainable).as_float32()
    assert all(not v.any() for v in initial.values())  # B = 0: the model starts as the base model
    assert m.adapter_numel == sum(a.size for a in frozen.values())  # half of plain LoRA's q,k,v,out adapter


def test_the_frozen_a_is_the_seeded_draw_and_the_seed_is_part_of_the_model_id(ffa_bundle):
    model, params = _torch_ffa(seed=0)
    frozen = ffa.frozen_factors(ffa_bundle)
    for base, fac in factors_by_name(model, params).items():
        np.testing.assert_array_equal(fac.lora_A.detach().numpy(), frozen[f"{base}.lora_A"])
        assert not fac.lora_A.requires_grad and fac.lora_B.requires_grad
    spec = LoraSpec("text", variant="ffa")
    assert lora_identity(spec, 0) != lora_identity(spec, 1)
    assert "variant" not in lora_identity(LoraSpec("text"), None)  # plain bundles keep their model_id


def test_both_backends_and_pytorch_train_b_alike_and_never_touch_a(ffa_bundle):
    data = batches(64)
    step_adapter, step_losses = run_backend(ffa_bundle, "step", data)
    ort_adapter, ort_losses = run_backend(ffa_bundle, "ort-training", data)
    model, params = _torch_ffa()
    clf = FeatureClassifier(model, tokenize_prompts(DIGITS, "a photo of a {}.", "clip-tiny"))
    opt = torch.optim.AdamW(params.values(), lr=5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    torch_losses = []
    for x, y in data:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(clf(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
        torch_losses.append(float(loss.detach()))
    torch_adapter = {k: p.detach().numpy().copy() for k, p in params.items()}
    assert sorted(step_adapter) == sorted(ort_adapter) == sorted(ffa_bundle.manifest.trainable_names)
    assert_same_adapter(step_adapter, ort_adapter)
    assert_same_adapter(step_adapter, torch_adapter)
    np.testing.assert_allclose(step_losses, ort_losses, rtol=1e-3)
    np.testing.assert_allclose(step_losses, torch_losses, rtol=1e-3)
    assert step_losses[-4:].mean() < 0.7 * step_losses[:4].mean()  # B alone learns
    frozen = ffa.frozen_factors(ffa_bundle)
    for base, fac in factors_by_name(model, params).items():  # PyTorch's A stayed the bundle's
        np.testing.assert_array_equal(fac.lora_A.detach().numpy(), frozen[f"{base}.lora_A"])


def test_the_inference_model_takes_b_alone_and_agrees_with_the_trainer(ffa_bundle):
    trainer = open_trainer(ffa_bundle, "step")
    trainer.set_lr(5e-3)
    for x, y in batches(64, steps=5):
        trainer.train_step(x, y)
    x = batches(64, steps=1, seed=9)[0][0]
    session = inference_session(ffa_bundle.path(INFERENCE_MODEL))
    assert [i.name for i in session.get_inputs()][1:] == ffa_bundle.manifest.trainable_names
    evaluator = AdapterEvaluator(ffa_bundle)
    evaluator.set_adapter(trainer.get_adapter())
    np.testing.assert_allclose(evaluator.logits(x), trainer.logits(x), rtol=1e-4, atol=1e-4)


def test_the_weights_move_linearly_in_b_and_clipping_b_bounds_them_exactly(ffa_bundle):
    """The graph's weight is W + s B A (read off the parametrized model); its change for a clipped dB is
    s dB A, whose norm is at most C s max||A||_2, reached along the worst target's top singular vector."""
    model, params = _torch_ffa()
    frozen = ffa.frozen_factors(ffa_bundle)
    scale = ffa_bundle.manifest.lora.scale
    rng = np.random.default_rng(0)
    global_b = {k: rng.normal(0, 0.3, tuple(p.shape)).astype(np.float32) for k, p in params.items()}
    local_b = {k: v + rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in global_b.items()}
    clip = 0.05
    clipped = dp.clip_update(local_b, global_b, clip).tensors
    weight = model.transformer.resblocks[1].attn.out_proj  # parametrized: .weight is W + s B A

    def out_proj_weight(b):
        load_lora_(params, {k: torch.from_numpy(v) for k, v in b.items()})
        return weight.weight.detach().double().numpy()

    name = "text.resblocks.1.attn.out.lora_B"
    moved = out_proj_weight(clipped) - out_proj_weight(global_b)
    changes = ffa.weight_changes({k: clipped[k] - global_b[k] for k in clipped}, frozen, scale)
    np.testing.assert_allclose(moved, changes[name[: -len(".lora_B")]], atol=1e-5)  # linear in B, A constant
    bound = ffa.weight_sensitivity(clip, scale, frozen)
    assert ffa.frobenius(changes) <= bound * (1 + 1e-6)
    worst = max(frozen, key=lambda k: np.linalg.norm(frozen[k], 2))  # its A has the largest singular value
    b_name = worst[: -len("lora_A")] + "lora_B"
    u, _, _ = np.linalg.svd(frozen[worst].astype(np.float64))
    along = {k: np.zeros(v.shape) for k, v in global_b.items()}
    along[b_name] = clip * np.outer(np.eye(global_b[b_name].shape[0])[0], u[:, 0])  # ||dB|| = clip
    assert math.isclose(math.sqrt(sum(float(np.sum(v ** 2)) for v in along.values())), clip)
    assert math.isclose(ffa.frobenius(ffa.weight_changes(along, frozen, scale)), bound, rel_tol=1e-9)  # tight


def test_plain_lora_weight_changes_grow_with_the_globals_b_whatever_the_clip():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 0.1, (8, 64)), rng.normal(0, 0.1, (64, 8))
    da, db = rng.normal(0, 1, a.shape), rng.normal(0, 1, b.shape)
    norm = math.sqrt(np.sum(da ** 2) + np.sum(db ** 2))
    da, db = 0.05 * da / norm, 0.05 * db / norm  # a change of (A, B) clipped to 0.05
    changes = [np.linalg.norm((k * b + db) @ (a + da) - (k * b) @ a) for k in (1, 10, 100)]
    assert changes[2] > 20 * changes[0]  # the cross term (kB) dA: no bound from the clip alone


def test_frozen_factors_refuses_a_plain_bundle(tiny_text_bundle):
    with pytest.raises(BundleError, match="its A tensors are trained"):
        ffa.frozen_factors(tiny_text_bundle)
