"""The offline proxy CLIP: glyphs made as scikit-learn's digits were, its objective, and its checkpoint loaded
through the same --pretrained path as real weights (a few-step pre-training; setup.sh runs the real one)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flora.edge.fileio import sha256_file
from flora.edge.trainers import open_trainer
from flora.export import glyphs, proxy
from flora.export.loading import WeightsError, state_sha256
from flora.export.pipeline import ExportOptions, export_bundle

from .helpers import DIGITS, TINY_PROXY


def test_glyphs_have_the_format_of_scikit_learns_digits_and_are_seeded():
    classes = glyphs.glyph_classes()
    assert len(classes) == 36 and [c.name for c in classes[:10]] == list(glyphs.DIGIT_NAMES)
    assert classes[17].name == "letter h" and classes[17].chars == ("h", "H")
    cells, labels = glyphs.corpus(200, seed=5, classes=classes)
    assert cells.shape == (200, 8, 8) and cells.dtype == np.uint8 and cells.max() <= 16
    assert 2.0 < cells.mean() < 9.0  # ink covers a share of the box like the digits (mean 4.9)
    again, labels2 = glyphs.corpus(200, seed=5, classes=classes)
    assert np.array_equal(cells, again) and np.array_equal(labels, labels2)
    assert not np.array_equal(cells, glyphs.corpus(200, seed=6, classes=classes)[0])
    grey = glyphs.as_grey_images(np.array([[[0, 8, 16] + [0] * 5] * 8], np.uint8))[0]
    assert grey.mode == "L" and list(np.asarray(grey)[0, :3]) == [0, 128, 255]  # round(v * 255 / 16), as the sim


def test_every_digit_has_the_zero_shot_prompt_among_its_captions():
    texts, owner = proxy.captions(glyphs.glyph_classes())
    for c, name in enumerate(glyphs.DIGIT_NAMES):
        assert proxy.ZERO_SHOT_TEMPLATE.format(name) in [t for t, o in zip(texts, owner) if o == c]
    assert "the digit 7" in texts and "a photo of a letter k." in texts
    assert len(texts) == len(set(texts))


def test_the_cut_context_text_encoder_equals_open_clips():
    model = proxy.new_model(0).eval()
    tokens = proxy.tokenize(["a photo of a seven.", "the digit 7", "a small picture of a letter q."])
    with torch.no_grad():
        ours = proxy.encode_text(model, tokens)
        theirs = model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_the_multi_positive_loss_is_clips_loss_with_one_positive_and_rewards_the_right_matches():
    torch.manual_seed(0)
    logits = torch.randn(6, 6) * 3
    eye = torch.eye(6, dtype=torch.bool)
    target = torch.arange(6)
    clip = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    torch.testing.assert_close(proxy.multi_positive_loss(logits, eye), clip)
    labels = torch.tensor([0, 0, 1, 1])  # two images of each class against two captions, one per class
    positive = labels[:, None] == torch.tensor([0, 1])[None, :]
    right = torch.tensor([[5.0, 0], [5, 0], [0, 5], [0, 5]])
    assert proxy.multi_positive_loss(right, positive) < 0.05 < proxy.multi_positive_loss(-right, positive)


def test_a_short_pre_training_lowers_the_loss_and_is_reproducible(tmp_path):
    cfg = proxy.ProxyConfig(**TINY_PROXY)
    said = []
    path = proxy.build(tmp_path / "a", cfg, say=said.append)
    record = json.loads((tmp_path / "a" / proxy.RECORD).read_text())
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in said if "proxy step" in line]
    assert losses[-1] < losses[0]
    assert record["config"]["steps"] == cfg.steps and 0.0 <= record["zero_shot_sklearn_digits"] <= 1.0
    assert proxy.sha256_file(path) == record["sha256"]
    said.clear()
    assert proxy.build(tmp_path / "a", cfg, say=said.append) == path and "up to date" in said[0]
    assert proxy.cached(tmp_path / "a", proxy.ProxyConfig(**{**TINY_PROXY, "seed": 1})) is None
    with pytest.raises(ValueError):
        proxy.ProxyConfig(steps=0)


def test_the_same_command_makes_the_same_bytes(tmp_path):
    """Two fresh processes (as two machines of one kind would run setup.sh) write identical checkpoints."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_PROXY.items()]
    shas = []
    for name in ("a", "b"):
        proc = subprocess.run([sys.executable, "-m", "flora.export.proxy_cli", "--out", str(tmp_path / name),
                               "-q", *args], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == str(tmp_path / name / proxy.CHECKPOINT)
        shas.append(json.loads((tmp_path / name / proxy.RECORD).read_text())["sha256"])
    assert shas[0] == shas[1] == proxy.sha256_file(tmp_path / "a" / proxy.CHECKPOINT)


def write_digits_png(folder, cells):
    paths = []
    for i, img in enumerate(glyphs.as_grey_images(cells)):
        paths.append(folder / f"{i}.png")
        img.save(paths[-1])
    return paths


def test_the_clip_proxy_preset_loads_the_checkpoint_like_real_weights(tmp_path, tiny_proxy):
    from flora.edge.features import image_features

    bundle = export_bundle(ExportOptions(preset="clip-proxy", classes=list(DIGITS), out=tmp_path / "b"),
                           say=lambda _m: None)
    m = bundle.manifest
    assert m.pretrained["source"] == "file" and m.pretrained["file"] == tiny_proxy.name  # the name, never a path
    assert m.pretrained["file_sha256"] == sha256_file(tiny_proxy)
    model = proxy.new_model(1)
    from open_clip.factory import load_checkpoint

    load_checkpoint(model, str(tiny_proxy))
    model.eval()
    assert m.base_weights_sha256 == state_sha256(model)
    assert m.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    # zero-shot through the bundle (ONNX image encoder, then the inference model) equals the torch model's
    cells, _ = proxy.sklearn_digits()
    (tmp_path / "png").mkdir()
    paths = write_digits_png(tmp_path / "png", cells[:24])
    from flora.edge.bundle import load_bundle

    loaded = load_bundle(tmp_path / "b")
    feats = image_features(loaded, paths)
    logits = open_trainer(loaded).logits(feats)
    with torch.no_grad():
        img = F.normalize(model.encode_image(proxy.pixels_of(cells[:24])), dim=-1)
        txt = proxy.encode_text(model, proxy.tokenize([proxy.ZERO_SHOT_TEMPLATE.format(d) for d in DIGITS]))
        expected = (model.logit_scale.exp() * img @ txt.t()).numpy()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-3)
    # the same file through --pretrained on clip-tiny gives the same base weights
    same = export_bundle(ExportOptions(preset="clip-tiny", classes=list(DIGITS), out=tmp_path / "c",
                                       pretrained=str(tiny_proxy)), say=lambda _m: None)
    assert same.manifest.base_weights_sha256 == m.base_weights_sha256


def test_without_the_checkpoint_clip_proxy_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FLORA_PROXY_DIR", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match="run `flora-proxy` once"):
        export_bundle(ExportOptions(preset="clip-proxy", classes=list(DIGITS), out=tmp_path / "b"),
                      say=lambda _m: None)
    assert not (tmp_path / "b").exists()


def test_pixels_go_through_the_agents_preprocessing():
    from flora.edge.preprocess import preprocess

    cells = glyphs.corpus(3, seed=0, classes=glyphs.glyph_classes())[0]
    img = Image.fromarray(np.round(cells[1] * (255 / 16)).astype(np.uint8))
    np.testing.assert_array_equal(proxy.pixels_of(cells)[1].numpy(), preprocess(img, proxy.proxy_preprocess()))
