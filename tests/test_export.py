"""flora-export: the bundle's graphs equal open_clip, train only LoRA, and bad input leaves nothing behind."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from flora.edge import adapter
from flora.edge.bundle import (
    ADAPTER,
    EVAL_MODEL,
    IMAGE_ENCODER,
    INFERENCE_MODEL,
    MANIFEST,
    TRAINING_MODEL,
    BundleError,
    Manifest,
    load_bundle,
)
from flora.edge.fileio import sha256_file
from flora.edge.trainers.ort_training import OrtTrainingTrainer
from flora.export import cli, pipeline
from flora.export.graphs import tokenize_prompts
from flora.export.loading import WeightsSource, build_model, resolve_weights, state_sha256
from flora.export.lora import LoraSpec, attach_lora, load_lora_
from flora.export.pipeline import ExportError, check_classes, check_output, check_template
from flora.export.presets import get_preset

from .helpers import DIGITS, export_tiny


def reference_model(seed: int = 0):
    return build_model(get_preset("clip-tiny"), WeightsSource("random-init", None, None, False, seed))


def zero_shot_logits(model, pixels: torch.Tensor, classes=DIGITS) -> np.ndarray:
    tokens = tokenize_prompts(classes, "a photo of a {}.", "clip-tiny")
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
        return (model.logit_scale.exp() * img @ txt.T).numpy()


def run_onnx(path: Path, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def random_adapter(bundle, seed: int, scale: float = 0.05) -> dict:
    rng = np.random.default_rng(seed)
    return {t.name: (rng.standard_normal(t.shape) * scale).astype(np.float32) for t in bundle.manifest.trainable}


def test_trainable_parameters_are_exactly_the_manifest_lora_list(tiny_text_bundle):
    manifest = tiny_text_bundle.manifest
    trainer = OrtTrainingTrainer(tiny_text_bundle)
    state = trainer._state
    trainable = {name: tuple(p.data.shape) for name, p in state.parameters if p.requires_grad}
    assert trainable == {t.name: t.shape for t in manifest.trainable}
    assert len(trainable) == 2 * 4 * 2  # 2 blocks x q,k,v,out x (A, B)
    frozen = [name for name, p in state.parameters if not p.requires_grad]
    assert frozen and not any("lora" in name for name in frozen)
    initial = adapter.load_file(tiny_text_bundle.path(ADAPTER), manifest.trainable, model_id=manifest.model_id)
    assert initial.meta.kind == "initial" and initial.meta.round == 0
    for name, arr in initial.tensors.items():
        np.testing.assert_array_equal(arr, state.parameters[name].data)
        assert (arr == 0).all() == name.endswith("lora_B")


def test_manifest_describes_the_bundle(tiny_text_bundle):
    m = tiny_text_bundle.manifest
    assert m.lora.tower == "text" and m.lora.rank == 8 and m.lora.targets == ("q", "k", "v", "out")
    assert m.input_kind == "features" and m.feature_dim == 64
    assert m.classes == tuple(DIGITS) and m.prompt_template == "a photo of a {}."
    assert m.preprocess.image_size == 32 and m.preprocess.interpolation == "bicubic"
    assert m.text_context == 8  # "a photo of a seven." is 6 words + '.' + SOT/EOT tokens
    assert m.base_weights_sha256 == state_sha256(reference_model())
    assert len(m.model_id) == 64
    assert set(m.files) == {
        "adapter.safetensors", "checkpoint", "eval_model.onnx", "image_encoder.onnx",
        "inference_model.onnx", "optimizer_model.onnx", "training_model.onnx", "weights.data",
    }
    # the float graphs keep their weights in one shared file (tests/test_bundle_size.py)
    assert m.external_data == {"image_encoder.onnx": ("weights.data",), "inference_model.onnx": ("weights.data",)}
    assert m.onnx["tested_onnxruntime"]["onnxruntime-training"] == ort.__version__  # what this suite runs


def test_ort_training_models_name_their_outputs_loss_and_logits(tiny_text_bundle):
    import onnx

    for name in (TRAINING_MODEL, EVAL_MODEL):
        outputs = [o.name for o in onnx.load(str(tiny_text_bundle.path(name))).graph.output]
        assert outputs[:2] == ["loss", "logits"], name


def test_attention_projects_q_k_v_without_gathers_to_differentiate(tiny_vision_bundle):
    """Gather's training gradient (GatherGrad, a scatter-add) took 39 % of a ViT-B/32 vision step:
    q, k and v must come from slices of the packed weight (export.onnx_export.packed_projection_as_split)."""
    import onnx

    ops = [n.op_type for n in onnx.load(str(tiny_vision_bundle.path(TRAINING_MODEL))).graph.node]
    assert "GatherGrad" not in ops
    assert ops.count("SplitTraining") >= 2  # one packed weight per block, its gradient gathered from 3 slices


def test_image_encoder_features_equal_open_clip_encode_image(tiny_text_bundle):
    model = reference_model()
    pixels = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = model.encode_image(pixels).numpy()
    got = run_onnx(tiny_text_bundle.path(IMAGE_ENCODER), {"pixels": pixels.numpy()})
    assert np.abs(got - expected).max() <= 1e-4


def test_text_mode_eval_logits_equal_pytorch_zero_shot(tiny_text_bundle):
    model = reference_model()
    pixels = torch.randn(6, 3, 32, 32)
    features = run_onnx(tiny_text_bundle.path(IMAGE_ENCODER), {"pixels": pixels.numpy()})
    got = OrtTrainingTrainer(tiny_text_bundle).logits(features)
    expected = zero_shot_logits(model, pixels)  # open_clip's full 77-token text path
    assert got.shape == (6, 10)
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("fixture", ["tiny_vision_bundle", "tiny_both_bundle"])
def test_pixel_mode_eval_logits_equal_pytorch_zero_shot(fixture, request):
    bundle = request.getfixturevalue(fixture)
    assert bundle.manifest.input_kind == "pixels" and not bundle.path(IMAGE_ENCODER).exists()
    pixels = torch.randn(4, 3, 32, 32)
    got = OrtTrainingTrainer(bundle).logits(pixels.numpy())
    assert np.abs(got - zero_shot_logits(reference_model(), pixels)).max() <= 1e-4


def test_inference_model_takes_the_adapter_as_inputs(tiny_text_bundle):
    trainer = OrtTrainingTrainer(tiny_text_bundle)
    tensors = random_adapter(tiny_text_bundle, seed=3)
    trainer.set_adapter(tensors)
    features = np.random.default_rng(0).standard_normal((7, 64)).astype(np.float32)
    expected = trainer.logits(features)
    got = run_onnx(tiny_text_bundle.path(INFERENCE_MODEL), {"features": features, **tensors})
    assert np.abs(got - expected).max() <= 1e-4
    zero_shot = run_onnx(
        tiny_text_bundle.path(INFERENCE_MODEL),
        {"features": features, **adapter.load_file(tiny_text_bundle.path(ADAPTER)).tensors},
    )
    assert np.abs(got - zero_shot).max() > 1e-2  # the adapter really changes the classifier


def _teacher_task(dim: int, n: int = 64, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    y = (x @ rng.standard_normal((dim, classes))).argmax(axis=1).astype(np.int64)
    return x, y


def test_ort_training_learns_and_leaves_every_frozen_tensor_bit_identical(tiny_text_bundle):
    trainer = OrtTrainingTrainer(tiny_text_bundle)
    frozen_before = {n: p.data.copy() for n, p in trainer._state.parameters if not p.requires_grad}
    lora_before = trainer.get_adapter()
    x, y = _teacher_task(64)
    trainer.set_lr(1e-2)
    losses = [trainer.train_step(x, y).loss for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0], losses
    lora_after = trainer.get_adapter()
    changed = [n for n in lora_after if not np.array_equal(lora_after[n], lora_before[n])]
    assert sorted(changed) == sorted(lora_after)  # every LoRA tensor moved (A too, once B is non-zero)
    for name, before in frozen_before.items():
        np.testing.assert_array_equal(trainer._state.parameters[name].data, before, err_msg=name)


def _torch_adamw_step(start: dict, x: np.ndarray, y: np.ndarray, lr: float, weight_decay: float) -> dict:
    """The LoRA tensors after one torch.optim.AdamW step of the clip-tiny text-mode classifier."""
    from flora.export.graphs import FeatureClassifier

    model = reference_model()
    params = attach_lora(model, LoraSpec("text", rank=8, alpha=16.0))
    load_lora_(params, {k: torch.from_numpy(v) for k, v in start.items()})
    clf = FeatureClassifier(model, tokenize_prompts(DIGITS, "a photo of a {}.", "clip-tiny"))
    opt = torch.optim.AdamW(params.values(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    torch.nn.functional.cross_entropy(clf(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    opt.step()
    return {name: p.detach().numpy().copy() for name, p in params.items()}


def _max_abs_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(a[name] - b[name]).max()) for name in a)


#: ORT vs PyTorch after one AdamW step: measured max abs difference 1.6e-7 (clip-tiny, seeds 7 and 8,
#: weight decay 0, 0.5 and 1); the decay term lr * wd * |p| at wd = 1 moves tensors by up to ~1e-3.
ADAMW_ATOL = 1e-6


@pytest.mark.parametrize(("weight_decay", "other_decay"), [(0.0, 1.0), (1.0, 0.0)])
def test_one_ort_adamw_step_matches_pytorch_adamw(tmp_path, weight_decay, other_decay):
    bundle = export_tiny(tmp_path / "b", weight_decay=weight_decay)
    start = random_adapter(bundle, seed=7)
    x, y = _teacher_task(64, n=16)
    lr = 5e-3

    trainer = OrtTrainingTrainer(bundle)
    trainer.set_adapter(start)
    trainer.set_lr(lr)
    trainer.train_step(x, y)
    ort_after = trainer.get_adapter()

    same = _torch_adamw_step(start, x, y, lr, weight_decay)
    assert _max_abs_diff(ort_after, same) <= ADAMW_ATOL
    # the check can tell the bundle's weight decay apart: PyTorch with the other decay disagrees
    other = _torch_adamw_step(start, x, y, lr, other_decay)
    assert _max_abs_diff(ort_after, other) > 100 * ADAMW_ATOL
    assert _max_abs_diff(ort_after, start) > 1e-3  # the step did something measurable


# --- bad input ----------------------------------------------------------------------------------


def _classes_file(tmp_path: Path, lines) -> Path:
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []


@pytest.mark.parametrize(
    ("argv_extra", "lines", "message"),
    [
        (["clip-vitb99"], DIGITS, "unknown model 'clip-vitb99'; did you mean clip-vitb32"),
        (["clip-tiny"], ["# only a comment", ""], "the class list is empty"),
        (["clip-tiny"], ["cat", "", "# c", "dog", "cat"], "repeats 'cat' (lines 1 and 5)"),
        (["clip-tiny", "--prompt", "a photo"], DIGITS, "must contain exactly one '{}'"),
        (["clip-tiny", "--prompt", "{} {x}"], DIGITS, "template '{} {x}' must contain exactly one '{}' for the "
                                                      "class name and no other '{...}' field"),
        (["clip-tiny", "--prompt", "a {} {"], DIGITS, "template 'a {} {' is not a valid template "
                                                      "(Single '{' encountered in format string)"),
        (["clip-tiny", "--rank", "0"], DIGITS, "rank must be >= 1"),
        (["clip-tiny", "--targets", "q,zz"], DIGITS, "(unknown: 'zz') must be a non-empty subset"),
    ],
)
def test_bad_input_is_a_clear_error_with_nothing_written(tmp_path, capsys, argv_extra, lines, message):
    out = tmp_path / "bundle"
    code = cli.main([*argv_extra, "--classes", str(_classes_file(tmp_path, lines)), "--out", str(out), "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    _assert_nothing_left(out)


def test_check_classes_names_positions_in_a_plain_list():
    with pytest.raises(ExportError, match=r"repeats 'cat' \(entries 1 and 3\), 'dog' \(entries 2 and 4\)"):
        check_classes(["cat", "dog", "cat", "dog"])
    assert check_classes([" cat ", "dog"]) == ["cat", "dog"]


def test_templates_with_escaped_braces_are_accepted():
    assert check_template("a {{photo}} of a {}.").format("cat") == "a {photo} of a cat."


def test_unwritable_output_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    classes = _classes_file(tmp_path, DIGITS)
    code = cli.main(["clip-tiny", "--classes", str(classes), "--out", str(blocker / "sub" / "bundle"), "-q"])
    assert code == 2
    assert f"{blocker} is not a writable folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "classes.txt"]
    assert blocker.read_text() == "not a folder"


def test_force_refuses_to_replace_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    (out / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    code = cli.main(["clip-tiny", "--classes", str(_classes_file(tmp_path, DIGITS)), "--out", str(out),
                     "--force", "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{out} is not a FLORA bundle (no manifest.json with format 'flora-bundle')" in err
    assert "--force replaces only bundles" in err
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg", MANIFEST]
    assert (out / "holiday.jpg").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.txt", "photos"]


def test_force_may_fill_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", force=True)  # no error
    with pytest.raises(ExportError, match="already exists; pass --force"):
        check_output(tmp_path / "empty", force=False)


def _fake_bundle(folder: Path, marker: str) -> Path:
    folder.mkdir()
    (folder / MANIFEST).write_text(json.dumps({"format": "flora-bundle", "marker": marker}))
    return folder


def test_a_failed_final_rename_puts_the_old_bundle_back(tmp_path, monkeypatch):
    target = _fake_bundle(tmp_path / "bundle", "old")
    new = _fake_bundle(tmp_path / ".bundle.tmp-1", "new")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == new:
            raise OSError(errno.EXDEV, "simulated rename failure", str(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated rename failure"):
        pipeline._replace_dir(new, target)
    assert json.loads((target / MANIFEST).read_text())["marker"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.tmp-1", "bundle"]  # the caller removes tmp


def test_a_disk_error_mid_export_is_one_clear_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from flora.export import onnx_export

    def disk_full(model, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(onnx_export, "save_model", disk_full)
    classes = _classes_file(tmp_path, DIGITS)
    out = tmp_path / "new" / "deeper" / "bundle"
    code = cli.main(["clip-tiny", "--classes", str(classes), "--out", str(out), "-q"])
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"flora-export: error: export failed, nothing was written to {out}: ")
    assert "[Errno 28] No space left on device" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.txt"]  # new/deeper made and removed again


def test_a_failure_keeps_parent_folders_that_existed_before(tmp_path, monkeypatch):
    from flora.export import onnx_export

    def disk_full(model, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(onnx_export, "save_model", disk_full)
    (tmp_path / "existing").mkdir()
    out = tmp_path / "existing" / "made" / "bundle"
    with pytest.raises(ExportError, match="No space left on device"):
        export_tiny(out)
    assert (tmp_path / "existing").is_dir() and list((tmp_path / "existing").iterdir()) == []


def test_existing_bundle_needs_force_and_is_replaced_whole(tmp_path, capsys):
    out = tmp_path / "bundle"
    classes = _classes_file(tmp_path, DIGITS)
    assert cli.main(["clip-tiny", "--classes", str(classes), "--out", str(out), "-q"]) == 0
    assert load_bundle(out).manifest.backends == ("ort-training", "step")  # the default: a bundle for any device
    first = load_bundle(out).manifest.model_id
    assert cli.main(["clip-tiny", "--classes", str(classes), "--out", str(out), "-q"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert load_bundle(out).manifest.model_id == first
    classes.write_text("cat\ndog\n")
    assert cli.main(["clip-tiny", "--classes", str(classes), "--out", str(out), "--force", "--backend",
                     "ort-training", "-q"]) == 0
    assert load_bundle(out).manifest.classes == ("cat", "dog")
    _assert_nothing_left(tmp_path / "bundle-not-there")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle.")] == []


def test_a_failure_mid_export_leaves_no_half_written_bundle(tmp_path, monkeypatch):
    from flora.export import ort_artifacts

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while writing training artifacts")

    monkeypatch.setattr(ort_artifacts, "generate", boom)
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_tiny(out)
    _assert_nothing_left(out)


def test_missing_weights_offline_names_the_file_and_how_to_provide_it(tmp_path, capsys):
    out = tmp_path / "bundle"
    cache = tmp_path / "empty-cache"
    code = cli.main(["clip-vitb32", "--classes", str(_classes_file(tmp_path, DIGITS)), "--out", str(out),
                     "--offline", "--cache-dir", str(cache), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K/open_clip_model.safetensors" in err
    assert str(cache) in err and "--pretrained PATH" in err
    _assert_nothing_left(out)


def test_missing_local_checkpoint_file_is_named(tmp_path, capsys):
    code = cli.main(["clip-vitb32", "--classes", str(_classes_file(tmp_path, DIGITS)), "--out",
                     str(tmp_path / "b"), "--pretrained", str(tmp_path / "nope.safetensors"), "-q"])
    assert code == 2
    assert f"checkpoint file {tmp_path / 'nope.safetensors'} does not exist" in capsys.readouterr().err


def test_pretrained_weights_from_a_local_checkpoint_file(tmp_path):
    source = reference_model(seed=5)
    ckpt = tmp_path / "tiny-weights.pt"
    torch.save(source.state_dict(), ckpt)
    bundle = export_tiny(tmp_path / "b", pretrained=str(ckpt))
    m = bundle.manifest
    assert m.pretrained["source"] == "file" and m.pretrained["file"] == "tiny-weights.pt"  # no workstation path
    assert m.pretrained["file_sha256"] == sha256_file(ckpt) and m.pretrained["format"] == "torch"
    assert m.base_weights_sha256 == state_sha256(source) != state_sha256(reference_model(seed=0))
    pixels = torch.randn(3, 3, 32, 32)
    features = run_onnx(bundle.path(IMAGE_ENCODER), {"pixels": pixels.numpy()})
    got = OrtTrainingTrainer(bundle).logits(features)
    assert np.abs(got - zero_shot_logits(source, pixels)).max() <= 1e-4


def test_open_clip_tag_is_resolved_from_the_hugging_face_cache(tmp_path):
    repo = tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    (snapshot / "open_clip_model.safetensors").write_bytes(b"weights")
    source = resolve_weights(get_preset("clip-vitb32"), pretrained=None, random_init=False,
                             cache_dir=str(tmp_path), offline=True)
    assert source.kind == "open_clip-cache" and source.tag == "laion2b_s34b_b79k"
    assert source.path == snapshot / "open_clip_model.safetensors"
    assert source.quick_gelu is False
    openai = resolve_weights(get_preset("clip-vitb32"), pretrained="openai", random_init=True)
    assert openai.kind == "random-init"  # --random-init wins over a tag


def test_bundle_verification_catches_a_modified_file(tmp_path):
    bundle = export_tiny(tmp_path / "b")
    manifest = json.loads(bundle.path("manifest.json").read_text())
    assert manifest["files"]["checkpoint"]
    with open(bundle.path("checkpoint"), "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="does not match its manifest sha256"):
        load_bundle(bundle.root)


def test_external_data_files_are_listed_hashed_and_verified(tmp_path, monkeypatch):
    from flora.export import onnx_export

    monkeypatch.setattr(onnx_export, "_PROTO_LIMIT", 0)  # graphs over protobuf's limit: saved with their data
    bundle = export_tiny(tmp_path / "b")
    m = bundle.manifest
    data = {IMAGE_ENCODER: ("weights.data",), INFERENCE_MODEL: ("weights.data",)}
    assert m.external_data == data  # the per-graph data files were merged into the shared one
    assert not list(bundle.root.glob("*.onnx.data"))
    assert bundle.path("weights.data").stat().st_size > 10_000
    assert m.files["weights.data"] == sha256_file(bundle.path("weights.data"))
    on_disk = json.loads(bundle.path(MANIFEST).read_text())
    assert on_disk["external_data"] == {k: list(v) for k, v in data.items()}
    pixels = torch.randn(2, 3, 32, 32)  # the encoder really reads its weights from the data file
    with torch.no_grad():
        expected = reference_model().encode_image(pixels).numpy()
    assert np.abs(run_onnx(bundle.path(IMAGE_ENCODER), {"pixels": pixels.numpy()}) - expected).max() <= 1e-4

    with open(bundle.path("weights.data"), "r+b") as fh:
        fh.seek(64)
        fh.write(b"\xff\xfe")
    with pytest.raises(BundleError, match=r"weights.data does not match its manifest sha256"):
        load_bundle(bundle.root)
    bundle.path("weights.data").unlink()
    with pytest.raises(BundleError, match=r"is missing weights.data"):
        load_bundle(bundle.root, backends=["ort-training"])


def test_manifest_external_data_must_name_files_inside_the_bundle(tiny_text_bundle):
    d = tiny_text_bundle.manifest.to_dict()
    d["external_data"] = {INFERENCE_MODEL: ["../elsewhere.data"]}
    with pytest.raises(BundleError, match=re.escape("'../elsewhere.data', which is not a file name inside the bundle")):
        Manifest.from_dict(d)


def _random_init_bundle_matches_zero_shot(preset_name: str, out: Path):
    """Export `preset_name --random-init` (text tower, ort-training) and check it against open_clip:
    image features and zero-B eval logits within 1e-4. Returns the bundle."""
    from flora.export.pipeline import ExportOptions, export_bundle

    preset = get_preset(preset_name)
    export_bundle(ExportOptions(preset=preset_name, classes=DIGITS, out=out, random_init=True,
                                backends=("ort-training",)), say=lambda m: None)
    bundle = load_bundle(out)
    model = build_model(preset, WeightsSource("random-init", None, None, False, 0))
    size = bundle.manifest.preprocess.image_size
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected_features = model.encode_image(pixels).numpy()
    features = run_onnx(bundle.path(IMAGE_ENCODER), {"pixels": pixels.numpy()})
    assert np.abs(features - expected_features).max() <= 1e-4
    tokens = tokenize_prompts(DIGITS, "a photo of a {}.", preset.architecture)
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        expected = (model.logit_scale.exp() * img @ model.encode_text(tokens, normalize=True).T).numpy()
    got = OrtTrainingTrainer(bundle).logits(features)
    assert np.abs(got - expected).max() <= 1e-4
    return bundle


@pytest.mark.slow
def test_random_init_mobileclip_eval_logits_equal_pytorch_zero_shot(tmp_path):
    """MobileCLIP: a timm image tower (FastViT) and a bidirectional text tower, whose prompts keep all 77 tokens."""
    bundle = _random_init_bundle_matches_zero_shot("MobileCLIP-S1", tmp_path / "mobileclip")
    m = bundle.manifest
    assert m.architecture == "MobileCLIP-S1" and m.preprocess.image_size == 256 and m.text_context == 77
    assert m.feature_dim == 512 and m.adapter_numel == 12 * 4 * 2 * 8 * 512


@pytest.mark.slow
def test_random_init_vitb32_eval_logits_equal_pytorch_zero_shot(tmp_path):
    bundle = _random_init_bundle_matches_zero_shot("clip-vitb32", tmp_path / "vitb32")
    assert bundle.manifest.adapter_numel == 12 * 4 * 2 * 8 * 512


@pytest.mark.slow
def test_random_init_vitb16_eval_logits_equal_pytorch_zero_shot(tmp_path):
    bundle = _random_init_bundle_matches_zero_shot("clip-vitb16", tmp_path / "vitb16")
    m = bundle.manifest
    assert m.architecture == "ViT-B-16" and m.preprocess.image_size == 224
    assert m.adapter_numel == 12 * 4 * 2 * 8 * 512  # same text tower as ViT-B/32
