"""Base weights as users hold them: every file format, snapshot folders, QuickGELU, any open_clip name, offline.

Each weight file is written here from a random-init model; the exported graphs must compute what
open_clip computes when it loads the same file.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import open_clip
import pytest
import torch
from open_clip.model import CLIP

from flora.edge.bundle import IMAGE_ENCODER, INFERENCE_MODEL
from flora.edge.fileio import sha256_file
from flora.export import cli, network
from flora.export.graphs import tokenize_prompts
from flora.export.loading import (
    WeightsError,
    WeightsSource,
    checkpoint_format,
    load_base,
    resolve_weights,
    state_sha256,
)
from flora.export.presets import CLIP_TINY_CONFIG, UnknownPresetError, get_preset

from .helpers import DIGITS, export_tiny


def tiny_model(seed: int, quick_gelu: bool = False) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(**CLIP_TINY_CONFIG, quick_gelu=quick_gelu).eval()


def logits_of(bundle, pixels: torch.Tensor) -> np.ndarray:
    """The bundle's zero-shot logits: image encoder, then the inference model with its initial adapter."""
    from flora.edge.adapter import load_file

    opts = ["CPUExecutionProvider"]
    features = ort.InferenceSession(str(bundle.path(IMAGE_ENCODER)), providers=opts).run(
        None, {"pixels": pixels.numpy()})[0]
    adapter = load_file(bundle.path("adapter.safetensors"), bundle.manifest.trainable).as_float32()
    return ort.InferenceSession(str(bundle.path(INFERENCE_MODEL)), providers=opts).run(
        None, {"features": features, **adapter})[0]


def open_clip_logits(model, pixels: torch.Tensor) -> np.ndarray:
    tokens = tokenize_prompts(DIGITS, "a photo of a {}.", "clip-tiny")
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        return (model.logit_scale.exp() * img @ model.encode_text(tokens, normalize=True).T).numpy()


def open_clip_loads(path: Path) -> CLIP:
    """open_clip's own loader on `path` (load_checkpoint into the architecture)."""
    from open_clip.factory import load_checkpoint

    model = CLIP(**CLIP_TINY_CONFIG)
    load_checkpoint(model, str(path))
    return model.eval()


class OpenAIStyle(torch.nn.Module):
    """A module laid out as OpenAI's released CLIP (same names, its three extra entries)."""

    def __init__(self, clip: CLIP) -> None:
        super().__init__()
        for name, child in clip.named_children():
            setattr(self, name, child)
        for name, param in clip.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name in ("input_resolution", "context_length", "vocab_size"):
            self.register_buffer(name, torch.tensor(32 if name == "input_resolution" else 77))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)


def write_openai_torchscript(path: Path, clip: CLIP) -> None:
    """A TorchScript archive in fp16, as OpenAI's ViT-B-32.pt: its forward is the image tower."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on MultiheadAttention's shape checks
        traced = torch.jit.trace(OpenAIStyle(clip), torch.zeros(1, 3, 32, 32), check_trace=False)
    traced.half().save(str(path))


def _write_safetensors(path: Path, model: CLIP) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.mark.parametrize("layout", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                                    "training-checkpoint.pt"])
def test_exported_graphs_carry_the_weights_of_the_file(tmp_path, layout):
    source = tiny_model(seed=11)
    path = tmp_path / layout
    if layout.endswith(".safetensors"):
        _write_safetensors(path, source)
    elif layout.endswith(".bin"):
        torch.save(source.state_dict(), path)
    else:  # a training run's checkpoint: {"state_dict": ...} with DataParallel's "module." prefix
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    bundle = export_tiny(tmp_path / "b", pretrained=str(path))
    m = bundle.manifest
    assert m.pretrained["source"] == "file" and m.pretrained["file"] == layout
    assert m.pretrained["file_sha256"] == sha256_file(path)
    assert m.pretrained["format"] == ("safetensors" if layout.endswith(".safetensors") else "torch")
    assert m.base_weights_sha256 == state_sha256(source)
    pixels = torch.randn(3, 3, 32, 32)
    expected = open_clip_logits(open_clip_loads(path), pixels)
    assert np.abs(logits_of(bundle, pixels) - expected).max() <= 1e-4
    assert np.abs(expected - open_clip_logits(tiny_model(seed=0), pixels)).max() > 1e-2  # not the default init


def test_openai_torchscript_archive_gets_quick_gelu_automatically(tmp_path, caplog):
    source = tiny_model(seed=12, quick_gelu=True)
    path = tmp_path / "ViT-B-32.pt"
    write_openai_torchscript(path, source)
    assert checkpoint_format(path) == "torchscript"
    bundle = export_tiny(tmp_path / "b", pretrained=str(path))
    m = bundle.manifest
    assert m.pretrained["format"] == "torchscript" and m.pretrained["quick_gelu"] is True
    pixels = torch.randn(3, 3, 32, 32)
    archive = torch.jit.load(str(path)).float()  # the file's own model: its traced image tower
    with torch.no_grad():
        own_features = archive(pixels).numpy()
    features = ort.InferenceSession(str(bundle.path(IMAGE_ENCODER)), providers=["CPUExecutionProvider"]).run(
        None, {"pixels": pixels.numpy()})[0]
    assert np.abs(features - own_features).max() <= 1e-3  # the archive computes in fp16 weights, upcast
    reference = tiny_model(seed=0, quick_gelu=True)  # open_clip's model with the file's (fp16) values
    reference.load_state_dict({k: v.half().float() for k, v in source.state_dict().items()})
    assert np.abs(logits_of(bundle, pixels) - open_clip_logits(reference, pixels)).max() <= 1e-4

    caplog.set_level(logging.WARNING)
    plain, _ = load_base(get_preset("clip-tiny"), WeightsSource("file", path, None, False))
    assert "looks like OpenAI's weights" in caplog.text and "--no-quick-gelu" in caplog.text
    with torch.no_grad():
        differs = np.abs(open_clip_logits(plain, pixels) - open_clip_logits(reference, pixels)).max()
    assert differs > 1e-3  # GELU instead of QuickGELU is another model


def test_hugging_face_snapshot_folder(tmp_path):
    source = tiny_model(seed=13)
    snapshot = tmp_path / "models--me--tiny-clip" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear",
                  "resize_mode": "squash"}
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": CLIP_TINY_CONFIG,
                                                                "preprocess_cfg": preprocess}))
    _write_safetensors(snapshot / "open_clip_model.safetensors", source)
    torch.save(tiny_model(seed=14).state_dict(), snapshot / "open_clip_pytorch_model.bin")  # not preferred
    bundle = export_tiny(tmp_path / "b", pretrained=str(snapshot))
    m = bundle.manifest
    assert m.pretrained["source"] == "folder" and m.pretrained["folder"] == "0123abcd"
    assert m.pretrained["file"] == "open_clip_model.safetensors"
    assert (list(m.preprocess.mean), m.preprocess.interpolation, m.preprocess.resize_mode) == \
        ([0.5] * 3, "bilinear", "squash")
    reference = open_clip.create_model(f"local-dir:{snapshot}").eval()  # open_clip reading the folder
    assert state_sha256(reference) == m.base_weights_sha256 == state_sha256(source)
    pixels = torch.randn(2, 3, 32, 32)
    assert np.abs(logits_of(bundle, pixels) - open_clip_logits(reference, pixels)).max() <= 1e-4


def test_a_folder_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no weights here")
    with pytest.raises(WeightsError, match="holds no open_clip weight file"):
        resolve_weights(get_preset("clip-tiny"), pretrained=str(tmp_path), random_init=False)


def test_a_file_of_another_architecture_is_a_clear_error(tmp_path):
    bigger = dict(CLIP_TINY_CONFIG, embed_dim=32)
    path = tmp_path / "other.safetensors"
    _write_safetensors(path, CLIP(**bigger))
    with pytest.raises(WeightsError, match=r"cannot load .*other\.safetensors into the model"):
        load_base(get_preset("clip-tiny"), resolve_weights(get_preset("clip-tiny"), pretrained=str(path),
                                                           random_init=False))


# -- any open_clip model ---------------------------------------------------------------------------
def test_any_open_clip_architecture_name_with_presets_as_aliases():
    assert get_preset("clip-vitb32").architecture == "ViT-B-32"
    assert get_preset("ViT-B/32").architecture == "ViT-B-32"  # open_clip's own spelling rule
    assert get_preset("MobileCLIP-S1").architecture == "MobileCLIP-S1"
    with pytest.raises(UnknownPresetError) as info:
        get_preset("ViT-B-33")
    text = str(info.value)
    assert "did you mean ViT-B-32" in text and "MobileCLIP-S2" in text and "clip-tiny" in text
    with pytest.raises(WeightsError, match=r"--pretrained TAG .*laion2b_s34b_b79k.*--random-init"):
        resolve_weights(get_preset("ViT-B-32"), pretrained=None, random_init=False)
    with pytest.raises(WeightsError, match=r"unknown open_clip tag .nope. for MobileCLIP-S1.*datacompdr"):
        resolve_weights(get_preset("MobileCLIP-S1"), pretrained="nope", random_init=False)


# -- offline ---------------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_hub_is_found_in_seconds_and_said_once(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for key in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(key, raising=False)
    network.forget()
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(DIGITS))
    t0 = time.monotonic()
    code = cli.main(["clip-vitb32", "--classes", str(classes), "--out", str(tmp_path / "b"),
                     "--cache-dir", str(tmp_path / "cache")])
    elapsed = time.monotonic() - t0
    captured = capsys.readouterr()
    said = [r.getMessage() for r in caplog.records if r.name.startswith("flora.")]
    error = [line for line in captured.err.splitlines() if line.startswith("flora-export: error:")]
    assert code == 2 and elapsed < 10, elapsed
    assert sum("--offline" in m for m in said) == 1 and any("is not reachable" in m for m in said), said
    assert len(error) == 1 and "--offline" not in captured.err.split("flora-export: error:")[1]
    assert "open_clip_model.safetensors" in captured.err  # still says which file it looked for
    assert not (tmp_path / "b").exists()


def test_probe_answers(monkeypatch):
    network.forget()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert network.reachable("127.0.0.1", server.getsockname()[1]) == (True, "")
    ok, why = network.reachable("127.0.0.1", _closed_port())
    assert not ok and "ConnectionRefusedError" in why
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert network.reachable("127.0.0.1", 1) == (False, "HF_HUB_OFFLINE is set")


def test_towers_lora_cannot_go_into_are_clear_errors():
    from torch import nn

    from flora.edge.errors import ConfigError
    from flora.export.lora import LoraSpec, attach_lora

    model = tiny_model(seed=0)
    model.visual = nn.Conv2d(3, 4, 3)  # like MobileCLIP's timm FastViT: no transformer blocks
    with pytest.raises(ConfigError, match=r"the image tower is Conv2d .not a ViT.*--lora-tower text"):
        attach_lora(model, LoraSpec("vision"))
    assert attach_lora(tiny_model(seed=0), LoraSpec("text"))  # the text tower takes LoRA as before
