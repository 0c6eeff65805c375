"""flora-export merge: the adapter merged into open_clip weights (or one ONNX file) computes what the bundle does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import open_clip
import pytest
import torch
from open_clip.model import CLIP

from flora.edge import adapter
from flora.edge.bundle import ADAPTER, IMAGE_ENCODER, INFERENCE_MODEL
from flora.export import cli
from flora.export.graphs import tokenize_prompts
from flora.export.loading import WeightsError
from flora.export.merge import MergeError, merge_checkpoint, merge_onnx
from flora.export.presets import CLIP_TINY_CONFIG

from .helpers import DIGITS, export_tiny

QUIET = {"say": lambda _m: None}
CPU = ["CPUExecutionProvider"]


def random_adapter_file(bundle, path: Path, seed: int, scale: float = 0.05) -> dict:
    rng = np.random.default_rng(seed)
    tensors = {t.name: (rng.standard_normal(t.shape) * scale).astype(np.float32) for t in bundle.manifest.trainable}
    blob = adapter.encode(tensors, model_id=bundle.manifest.model_id, round=7, kind="global")
    path.write_bytes(blob)
    return tensors


def bundle_logits(bundle, pixels: np.ndarray, tensors: dict) -> np.ndarray:
    x = pixels
    if bundle.manifest.needs_image_encoder:
        x = ort.InferenceSession(str(bundle.path(IMAGE_ENCODER)), providers=CPU).run(None, {"pixels": pixels})[0]
    feeds = {bundle.manifest.input_kind: x, **tensors}
    return ort.InferenceSession(str(bundle.path(INFERENCE_MODEL)), providers=CPU).run(None, feeds)[0]


def zero_shot(model, pixels: np.ndarray) -> np.ndarray:
    tokens = tokenize_prompts(DIGITS, "a photo of a {}.", "clip-tiny")
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(pixels), normalize=True)
        return (model.logit_scale.exp() * img @ model.encode_text(tokens, normalize=True).T).numpy()


@pytest.fixture(scope="module")
def tiny_architecture(tmp_path_factory) -> str:
    """clip-tiny registered as an open_clip architecture: create_model_and_transforms(name, pretrained=file) works."""
    folder = tmp_path_factory.mktemp("configs")
    (folder / "flora-tiny-test.json").write_text(json.dumps(CLIP_TINY_CONFIG))
    open_clip.add_model_config(folder / "flora-tiny-test.json")
    return "flora-tiny-test"


def test_a_zero_adapter_gives_back_the_base_weights_bit_for_bit(tiny_text_bundle, tmp_path):
    from safetensors.torch import load_file

    from flora.export.loading import WeightsSource, build_model
    from flora.export.presets import get_preset

    out = tmp_path / "merged.safetensors"
    result = merge_checkpoint(tiny_text_bundle.root, tiny_text_bundle.path(ADAPTER), out, **QUIET)
    assert result.changed == 0
    merged = load_file(str(out))
    base = build_model(get_preset("clip-tiny"), WeightsSource("random-init", None, None, False, 0)).state_dict()
    assert sorted(merged) == sorted(base)
    for name, tensor in base.items():
        assert merged[name].dtype == tensor.dtype and torch.equal(merged[name], tensor), name
        assert merged[name].numpy().tobytes() == tensor.numpy().tobytes(), name


@pytest.mark.parametrize("fixture", ["tiny_text_bundle", "tiny_both_bundle"])
def test_merged_checkpoint_loads_in_open_clip_and_equals_the_bundle(fixture, request, tmp_path, tiny_architecture):
    bundle = request.getfixturevalue(fixture)
    tensors = random_adapter_file(bundle, tmp_path / "global.safetensors", seed=3)
    out = tmp_path / "merged.safetensors"
    result = merge_checkpoint(bundle.root, tmp_path / "global.safetensors", out, **QUIET)
    spec = bundle.manifest.lora
    per_block = (1 if {"q", "k", "v"} & set(spec.targets) else 0) + len(set(spec.targets) & {"out", "fc", "proj"})
    assert result.changed == per_block * 2 * len(("text", "vision") if spec.tower == "both" else (spec.tower,))
    model, _, _ = open_clip.create_model_and_transforms(tiny_architecture, pretrained=str(out))
    pixels = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    expected = bundle_logits(bundle, pixels, tensors)
    assert np.abs(zero_shot(model.eval(), pixels) - expected).max() <= 1e-4
    assert np.abs(expected - bundle_logits(bundle, pixels, adapter.load_file(bundle.path(ADAPTER)).tensors)
                  ).max() > 1e-2  # the adapter changes the model


def test_an_ffa_lora_adapter_merges_with_the_bundles_frozen_a(tmp_path, tiny_architecture):
    bundle = export_tiny(tmp_path / "ffa", lora_variant="ffa")
    assert all(t.name.endswith("lora_B") for t in bundle.manifest.trainable)
    tensors = random_adapter_file(bundle, tmp_path / "g.safetensors", seed=8)
    merge_checkpoint(bundle.root, tmp_path / "g.safetensors", tmp_path / "m.safetensors", **QUIET)
    model, _, _ = open_clip.create_model_and_transforms(tiny_architecture, pretrained=str(tmp_path / "m.safetensors"))
    pixels = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert np.abs(zero_shot(model.eval(), pixels) - bundle_logits(bundle, pixels, tensors)).max() <= 1e-4


def test_folder_output_is_an_open_clip_local_dir(tiny_text_bundle, tmp_path):
    tensors = random_adapter_file(tiny_text_bundle, tmp_path / "g.safetensors", seed=4)
    out = tmp_path / "merged-model"
    merge_checkpoint(tiny_text_bundle.root, tmp_path / "g.safetensors", out, **QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    model = open_clip.create_model(f"local-dir:{out}").eval()
    pixels = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert np.abs(zero_shot(model, pixels) - bundle_logits(tiny_text_bundle, pixels, tensors)).max() <= 1e-4


def test_a_bundle_from_a_file_needs_that_file(tmp_path):
    torch.manual_seed(21)
    weights = tmp_path / "my-weights.pt"
    torch.save(CLIP(**CLIP_TINY_CONFIG).state_dict(), weights)
    bundle = export_tiny(tmp_path / "b", pretrained=str(weights))
    with pytest.raises(MergeError, match=r"exported from my-weights\.pt \(sha256 [0-9a-f]{16}…\).*--pretrained PATH"):
        merge_checkpoint(bundle.root, bundle.path(ADAPTER), tmp_path / "m.safetensors", **QUIET)
    other = tmp_path / "other.pt"
    torch.manual_seed(22)
    torch.save(CLIP(**CLIP_TINY_CONFIG).state_dict(), other)
    with pytest.raises(WeightsError, match=r"other\.pt is not the checkpoint the bundle was exported from"):
        merge_checkpoint(bundle.root, bundle.path(ADAPTER), tmp_path / "m.safetensors", pretrained=str(other),
                         **QUIET)
    result = merge_checkpoint(bundle.root, bundle.path(ADAPTER), tmp_path / "m.pt", pretrained=str(weights),
                              **QUIET)
    assert result.format == "torch" and result.changed == 0
    assert not (tmp_path / "m.safetensors").exists()


def test_adapter_of_another_bundle_is_refused(tiny_text_bundle, tiny_vision_bundle, tmp_path):
    with pytest.raises(adapter.AdapterError, match="is for model_id"):
        merge_checkpoint(tiny_text_bundle.root, tiny_vision_bundle.path(ADAPTER), tmp_path / "m.safetensors", **QUIET)


@pytest.mark.parametrize("fixture", ["tiny_text_bundle", "tiny_vision_bundle"])
def test_onnx_merge_is_one_graph_from_pixels_to_logits(fixture, request, tmp_path):
    bundle = request.getfixturevalue(fixture)
    tensors = random_adapter_file(bundle, tmp_path / "g.safetensors", seed=5)
    out = tmp_path / "model.onnx"
    merge_onnx(bundle.root, tmp_path / "g.safetensors", out, **QUIET)
    session = ort.InferenceSession(str(out), providers=CPU)
    assert [i.name for i in session.get_inputs()] == ["pixels"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["flora.classes"]) == DIGITS and meta["flora.adapter_round"] == "7"
    assert json.loads(meta["flora.preprocess"])["size"] == 32
    pixels = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    got = session.run(None, {"pixels": pixels})[0]
    assert np.abs(got - bundle_logits(bundle, pixels, tensors)).max() <= 1e-4  # ORT folds W + sBA at load


def test_merge_command_line(tiny_text_bundle, tmp_path, capsys):
    random_adapter_file(tiny_text_bundle, tmp_path / "g.safetensors", seed=6)
    out = tmp_path / "model.safetensors"
    code = cli.main(["merge", "--bundle", str(tiny_text_bundle.root), "--adapter", str(tmp_path / "g.safetensors"),
                     "--out", str(out)])
    assert code == 0 and out.is_file()
    said = capsys.readouterr().out
    assert "4 weight tensors changed by the adapter (round 7)" in said
    assert "create_model_and_transforms('clip-tiny'" in said
    code = cli.main(["merge", "--bundle", str(tiny_text_bundle.root), "--adapter", str(tmp_path / "nope"),
                     "--out", str(out)])
    assert code == 2 and "cannot read adapter" in capsys.readouterr().err
