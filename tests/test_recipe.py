"""`--recipe flora`: FLORA's authors' LoRA layout, scale, init, Adam and contrastive loss, equal to PyTorch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flora.edge.bundle import BundleError, Manifest
from flora.edge.trainers import open_trainer
from flora.export import cli, recipes
from flora.export.graphs import FeatureClassifier, tokenize_prompts
from flora.export.loading import WeightsSource, build_model
from flora.export.options import ExportError, LoraSpec, check_export
from flora.export.pipeline import lora_identity
from flora.export.presets import get_preset
from flora.export.step_graph import contrastive_loss

from .helpers import DIGITS, export_tiny


@pytest.fixture(scope="module")
def flora_bundle(tmp_path_factory):
    """clip-tiny random-init exported with the flora recipe's settings (as flora-export --recipe flora makes)."""
    settings = recipes.export_settings("flora", {})
    return export_tiny(tmp_path_factory.mktemp("bundles") / "tiny-flora", **settings)


def _cli_options(tmp_path, *extra):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(DIGITS) + "\n")
    argv = ["clip-tiny", "--random-init", "--classes", str(classes), "--out", str(tmp_path / "b"), *extra]
    parser = cli.build_parser()
    return cli.options_from_args(parser, parser.parse_args(argv), argv)


def test_recipe_flora_sets_the_authors_settings_and_explicit_options_override(tmp_path):
    opts = _cli_options(tmp_path, "--recipe", "flora")
    assert (opts.tower, opts.targets, opts.rank, opts.alpha) == ("text", ("out",), 2, 32.0)
    assert (opts.lora_scaling, opts.lora_init, opts.loss) == ("alpha", "gaussian", "contrastive")
    assert (opts.optimizer, opts.betas, opts.eps, opts.weight_decay) == ("adam", (0.9, 0.98), 1e-6, 0.2)
    assert opts.backends == ("step",)
    assert opts.recipe["name"] == "flora" and opts.recipe["overridden"] == []
    assert opts.recipe["training"] == {"epochs": 1, "batch_size": 128, "lr": 5e-5, "reset_optimizer": False}
    spec = check_export(opts).spec
    assert spec.scale == 32.0  # alpha itself, not alpha/rank = 16

    over = _cli_options(tmp_path, "--recipe", "flora", "--rank", "4", "--loss", "ce")
    assert (over.rank, over.loss, over.alpha, over.targets) == (4, "ce", 32.0, ("out",))
    assert over.recipe["overridden"] == ["loss", "rank"]
    assert check_export(over).spec.scale == 32.0

    plain = _cli_options(tmp_path)  # no recipe: the project's defaults, nothing recorded
    assert (plain.rank, plain.alpha, plain.lora_scaling, plain.loss, plain.optimizer) == (8, 16.0, "alpha/rank",
                                                                                        "ce", "adamw")
    assert plain.recipe is None and check_export(plain).spec.scale == 2.0


def test_the_ort_training_backend_refuses_adam_with_l2_decay(tmp_path):
    with pytest.raises(ExportError, match="decoupled weight decay"):
        check_export(_cli_options(tmp_path, "--recipe", "flora", "--backend", "all"))
    check_export(_cli_options(tmp_path, "--recipe", "flora", "--backend", "all", "--optimizer", "adamw",
                              "--loss", "ce"))


def test_the_scaling_is_part_of_the_model_id_and_the_manifest_checks_it():
    assert "scaling" not in lora_identity(LoraSpec("text"), None)
    assert lora_identity(LoraSpec("text", scaling="alpha"), None)["scaling"] == "alpha"
    assert LoraSpec("text", rank=2, alpha=32.0, scaling="alpha").scale == 32.0
    assert LoraSpec("text", rank=2, alpha=32.0).scale == 16.0


def test_the_manifest_records_the_recipe(flora_bundle):
    m = flora_bundle.manifest
    assert (m.lora.rank, m.lora.alpha, m.lora.scaling, m.lora.init, m.lora.scale) == (2, 32.0, "alpha", "gaussian",
                                                                                     32.0)
    assert m.trainable_names == [f"text.resblocks.{i}.attn.out.lora_{x}" for i in (0, 1) for x in "AB"]
    assert [t.shape for t in m.trainable] == [(2, 64), (64, 2)] * 2
    assert (m.optimizer.name, m.optimizer.betas, m.optimizer.eps, m.optimizer.weight_decay) == ("adam", (0.9, 0.98),
                                                                                                1e-6, 0.2)
    assert m.loss == "contrastive" and m.backends == ("step",)
    assert m.recipe["name"] == "flora" and m.recipe["settings"]["alpha"] == 32.0
    again = Manifest.from_dict(m.to_dict())
    assert again == m
    bad = m.to_dict()
    bad["loss"] = "hinge"
    with pytest.raises(BundleError, match="loss"):
        Manifest.from_dict(bad)
    bad = m.to_dict()
    bad["lora"]["scaling"] = "sqrt"
    with pytest.raises(BundleError, match="scaling"):
        Manifest.from_dict(bad)


def test_a_starts_gaussian_with_sd_one_over_sqrt_rank(flora_bundle):
    trainer = open_trainer(flora_bundle, "step")
    adapter = trainer.get_adapter()
    a = np.concatenate([adapter[n].ravel() for n in adapter if n.endswith("lora_A")])
    assert abs(a.std() - 1 / math.sqrt(2)) < 0.05 and abs(a.mean()) < 0.06  # 256 draws of N(0, 1/2)
    assert all(not adapter[n].any() for n in adapter if n.endswith("lora_B"))


def test_contrastive_loss_equals_clips_symmetric_loss_over_the_batch_text_embeddings():
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(12, 16, generator=gen), dim=-1)
    classes = F.normalize(torch.randn(5, 16, generator=gen), dim=-1)
    labels = torch.tensor([0, 1, 1, 4, 2, 2, 2, 3, 0, 4, 1, 3])  # repeats: same-class pairs are negatives
    text = classes[labels]  # the batch's text embeddings, one per image
    per_image = 100.0 * img @ text.t()
    truth = torch.arange(12)
    expected = (F.cross_entropy(per_image, truth) + F.cross_entropy(per_image.t(), truth)) / 2
    got = contrastive_loss(100.0 * img @ classes.t(), labels)
    assert abs(float(got) - float(expected)) <= 1e-5 * abs(float(expected))
    assert abs(float(got) - float(F.cross_entropy(100.0 * img @ classes.t(), labels))) > 1e-2  # not CE's


def _reference(bundle, start, data):
    """The authors' step by hand in PyTorch: out_proj.weight + 32 * B @ A, the symmetric loss over the batch's
    class-prompt embeddings, torch.optim.Adam(lr 5e-5, betas (0.9, 0.98), eps 1e-6, weight_decay 0.2)."""
    model = build_model(get_preset("clip-tiny"), WeightsSource("random-init", None, None, False, 0))
    for p in model.parameters():
        p.requires_grad_(False)
    clf = FeatureClassifier(model, tokenize_prompts(DIGITS, "a photo of a {}.", "clip-tiny"))
    lora = {n: torch.tensor(v, requires_grad=True) for n, v in start.items()}
    opt = torch.optim.Adam(lora.values(), lr=5e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    weights = {f"classes.transformer.resblocks.{i}.attn.out_proj.weight":
               model.transformer.resblocks[i].attn.out_proj.weight for i in (0, 1)}
    losses, grads = [], []
    for x, y in data:
        opt.zero_grad()
        params = {}
        for i, (name, w) in enumerate(weights.items()):
            base = f"text.resblocks.{i}.attn.out"
            params[name] = w + 32.0 * lora[f"{base}.lora_B"] @ lora[f"{base}.lora_A"]
        img = F.normalize(torch.from_numpy(x), dim=-1)
        text = torch.func.functional_call(clf.classes, {k[len("classes."):]: v for k, v in params.items()}, ())
        per_image = clf.logit_scale * img @ text[torch.from_numpy(y)].t()
        truth = torch.arange(len(y))
        loss = (F.cross_entropy(per_image, truth) + F.cross_entropy(per_image.t(), truth)) / 2
        loss.backward()
        grads.append({n: p.grad.detach().numpy().copy() for n, p in lora.items()})
        opt.step()
        losses.append(float(loss.detach()))
    return {n: p.detach().numpy() for n, p in lora.items()}, np.array(losses), grads


def test_the_exported_recipe_step_equals_pytorch(flora_bundle):
    rng = np.random.default_rng(1)
    trainer = open_trainer(flora_bundle, "step")
    start = {n: v.copy() for n, v in trainer.get_adapter().items()}
    for n in start:  # a non-zero B, so the loss itself depends on the scale (32 = alpha, not alpha/rank)
        if n.endswith("lora_B"):
            start[n] = (0.02 * rng.standard_normal(start[n].shape)).astype(np.float32)
    trainer.set_adapter(start)
    trainer.set_lr(5e-5)
    assert trainer.weight_decay == 0.2  # the manifest's
    data = [(rng.standard_normal((24, 64)).astype(np.float32), rng.integers(0, 10, 24).astype(np.int64))
            for _ in range(4)]
    first = trainer.train_step(*data[0])
    grad_b = trainer.optimizer_state()  # after one step from zero moments, m = (1 - beta1) (g + 0.2 p)
    onnx_grads = {n: grad_b[f"adam_m.{n}"] / 0.1 - 0.2 * start[n] for n in start}
    losses = [first.loss] + [trainer.train_step(x, y).loss for x, y in data[1:]]
    ref_adapter, ref_losses, ref_grads = _reference(flora_bundle, start, data)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for n in start:
        np.testing.assert_allclose(onnx_grads[n], ref_grads[0][n], rtol=1e-3, atol=1e-5, err_msg=n)
        np.testing.assert_allclose(trainer.get_adapter()[n], ref_adapter[n], rtol=1e-5, atol=1e-6, err_msg=n)
    assert max(np.abs(trainer.get_adapter()[n] - start[n]).max() for n in start) > 1e-5  # it moved


def test_flora_sim_recipe_gives_the_rounds_the_recipes_epochs_batch_lr_and_weight_decay(flora_bundle, tmp_path):
    from flora.sim import cli as sim_cli
    from flora.sim.run import SimConfig, aggregator_args, check_config, export_mismatch, export_training_settings

    parser = sim_cli.build_parser()
    argv = ["--recipe", "flora", "--out", str(tmp_path)]
    cfg = sim_cli.config_from_args(sim_cli.apply_recipe(parser, parser.parse_args(argv), argv))
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.recipe, cfg.effective_loss) == (1, 128, 5e-5, "flora",
                                                                                     "contrastive")
    argv = ["--recipe", "flora", "--epochs", "3"]
    assert sim_cli.config_from_args(sim_cli.apply_recipe(parser, parser.parse_args(argv), argv)).epochs == 3
    argv = []
    plain = sim_cli.config_from_args(sim_cli.apply_recipe(parser, parser.parse_args(argv), argv))
    assert (plain.epochs, plain.batch_size, plain.lr, plain.recipe) == (5, 32, 1e-3, None)

    settings = export_training_settings(cfg)
    assert settings["backends"] == ("step",) and settings["rank"] == 2 and settings["recipe"]["overridden"] == []
    assert export_training_settings(SimConfig(recipe="flora", epochs=3, batch_size=128, lr=5e-5))[
        "recipe"]["overridden"] == ["epochs"]
    args = aggregator_args(cfg, flora_bundle, "mqtt://127.0.0.1:1")
    values = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert (values["--epochs"], values["--batch-size"], values["--lr"], values["--weight-decay"]) == (
        "1", "128", "5e-05", "0.2")
    with pytest.raises(Exception, match="ort-training"):
        check_config(SimConfig(recipe="flora", backend="ort-training", out=tmp_path))
    assert "recipe" in (export_mismatch(flora_bundle, plain, DIGITS) or "")
    assert "loss" in (export_mismatch(flora_bundle, SimConfig(recipe="flora", loss="ce"), DIGITS) or "")


def test_contrastive_loss_on_both_backends_equals_pytorch(tmp_path):
    """--loss contrastive with AdamW: the ort-training artifacts and the step graph train alike, as PyTorch."""
    from flora.edge.adapter import load_file
    from flora.export.lora import attach_lora, load_lora_

    from .helpers import assert_same_adapter, batches, run_backend

    bundle = export_tiny(tmp_path / "b", backends=("ort-training", "step"), loss="contrastive")
    assert bundle.manifest.loss == "contrastive"
    data = batches(64, steps=6)
    step_adapter, step_losses = run_backend(bundle, "step", data)
    ort_adapter, ort_losses = run_backend(bundle, "ort-training", data)
    model = build_model(get_preset("clip-tiny"), WeightsSource("random-init", None, None, False, 0))
    params = attach_lora(model, LoraSpec("text"))
    start = load_file(bundle.path("adapter.safetensors")).tensors
    load_lora_(params, {k: torch.from_numpy(v) for k, v in start.items()})
    clf = FeatureClassifier(model, tokenize_prompts(DIGITS, "a photo of a {}.", "clip-tiny"))
    opt = torch.optim.AdamW(params.values(), lr=5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ref = []
    for x, y in data:
        opt.zero_grad()
        img = F.normalize(torch.from_numpy(x), dim=-1)
        per_image = clf.logit_scale * img @ clf.classes()[torch.from_numpy(y)].t()
        truth = torch.arange(len(y))
        loss = (F.cross_entropy(per_image, truth) + F.cross_entropy(per_image.t(), truth)) / 2
        loss.backward()
        opt.step()
        ref.append(float(loss.detach()))
    np.testing.assert_allclose(step_losses[0], ref[0], rtol=1e-5)
    np.testing.assert_allclose(ort_losses[0], ref[0], rtol=1e-5)
    np.testing.assert_allclose(step_losses, ref, rtol=1e-3)
    np.testing.assert_allclose(ort_losses, ref, rtol=1e-3)
    assert_same_adapter(step_adapter, ort_adapter)
    assert_same_adapter(step_adapter, {k: p.detach().numpy() for k, p in params.items()})
