"""flora-agent predict / evaluate: the federation's adapter in use, torch-free, equal to ONNX and PyTorch."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from flora.edge import adapter
from flora.edge.bundle import ADAPTER, IMAGE_ENCODER, INFERENCE_MODEL
from flora.edge.cli import main as agent_main
from flora.edge.predict import Predictor, choose_adapter, collect_images
from flora.edge.preprocess import preprocess_batch
from flora.edge.state import GLOBAL_FILE

from .helpers import DIGITS

CPU = ["CPUExecutionProvider"]


def adapter_of(bundle, seed: int, scale: float = 0.05) -> dict:
    rng = np.random.default_rng(seed)
    return {t.name: (rng.standard_normal(t.shape) * scale).astype(np.float32) for t in bundle.manifest.trainable}


def write_adapter(bundle, path: Path, tensors: dict, round_: int = 4) -> Path:
    path.write_bytes(adapter.encode(tensors, model_id=bundle.manifest.model_id, round=round_, kind="global"))
    return path


def onnx_logits(bundle, pixels: np.ndarray, tensors: dict) -> np.ndarray:
    x = pixels
    if bundle.manifest.needs_image_encoder:
        x = ort.InferenceSession(str(bundle.path(IMAGE_ENCODER)), providers=CPU).run(None, {"pixels": pixels})[0]
    session = ort.InferenceSession(str(bundle.path(INFERENCE_MODEL)), providers=CPU)
    return session.run(None, {bundle.manifest.input_kind: x, **tensors})[0]


def image_folder(root: Path, per_class: int = 3, classes=("zero", "one", "two")) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("fixture", ["tiny_text_bundle", "tiny_vision_bundle"])
def test_predictions_equal_the_onnx_inference_model_and_pytorch_with_merged_weights(fixture, request, tmp_path):
    import open_clip
    import torch

    from flora.export.graphs import tokenize_prompts
    from flora.export.merge import merge_checkpoint

    bundle = request.getfixturevalue(fixture)
    tensors = adapter_of(bundle, seed=1)
    predictor = Predictor(bundle, tensors)
    paths = sorted(image_folder(tmp_path / "img").rglob("*.png"))
    pixels = preprocess_batch(paths, bundle.manifest.preprocess)
    got = np.concatenate([logits for _, logits in predictor.predict_paths(paths, batch_size=4)])
    assert got.shape == (9, 10)
    assert np.abs(got - onnx_logits(bundle, pixels, tensors)).max() <= 1e-4

    merged = write_adapter(bundle, tmp_path / "g.safetensors", tensors)
    merge_checkpoint(bundle.root, merged, tmp_path / "merged", say=lambda _m: None)
    model = open_clip.create_model(f"local-dir:{tmp_path / 'merged'}").eval()
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(pixels), normalize=True)
        txt = model.encode_text(tokenize_prompts(DIGITS, "a photo of a {}.", "clip-tiny"), normalize=True)
        expected = (model.logit_scale.exp() * img @ txt.T).numpy()
    assert np.abs(got - expected).max() <= 1e-4


def test_text_mode_computes_the_class_embeddings_once(tiny_text_bundle):
    predictor = Predictor(tiny_text_bundle, adapter_of(tiny_text_bundle, seed=2))
    assert predictor._session is None  # the text tower ran once, at construction; images need only the encoder
    assert predictor.head.shape == (64, 10)
    features = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    session = ort.InferenceSession(str(tiny_text_bundle.path(INFERENCE_MODEL)), providers=CPU)
    expected = session.run(None, {"features": features, **adapter_of(tiny_text_bundle, seed=2)})[0]
    assert np.abs(predictor.logits_of_features(features) - expected).max() <= 1e-4


def test_default_adapter_is_the_state_dirs_latest_global_else_the_initial_one(tiny_text_bundle, tmp_path):
    initial = choose_adapter(tiny_text_bundle)
    assert initial.meta.kind == "initial" and "zero-shot" in initial.description
    assert choose_adapter(tiny_text_bundle, state_dir=tmp_path).meta.kind == "initial"
    tensors = adapter_of(tiny_text_bundle, seed=4)
    write_adapter(tiny_text_bundle, tmp_path / GLOBAL_FILE, tensors, round_=9)
    chosen = choose_adapter(tiny_text_bundle, state_dir=tmp_path)
    assert chosen.meta.round == 9 and "global adapter of round 9" in chosen.description
    np.testing.assert_array_equal(chosen.tensors[tiny_text_bundle.manifest.trainable_names[0]],
                                  tensors[tiny_text_bundle.manifest.trainable_names[0]])


def test_collect_images_from_files_folders_globs_and_stdin(tmp_path):
    root = image_folder(tmp_path / "img", per_class=2)
    (root / "zero" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.new("RGB", (4, 4)).save(root / ".hidden" / "x.png")
    folder = collect_images([str(root)])
    assert [p.relative_to(root).as_posix() for p in folder] == ["one/0.png", "one/1.png", "two/0.png",
                                                                "two/1.png", "zero/0.png", "zero/1.png"]
    assert collect_images([str(root / "*" / "1.png")]) == [root / "one/1.png", root / "two/1.png", root / "zero/1.png"]
    stdin = io.StringIO(f"{root / 'two/0.png'}\n\n{root / 'one/0.png'}\n")
    assert collect_images(["-", str(root / "one/0.png")], stdin=stdin) == [root / "two/0.png", root / "one/0.png"]


def _run(capsys, *argv) -> tuple:
    code = agent_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_command_formats_top_k_and_bad_images(tiny_text_bundle, tmp_path, capsys):
    root = image_folder(tmp_path / "img", per_class=2)
    b = str(tiny_text_bundle.root)
    code, out, err = _run(capsys, "predict", "--bundle", b, str(root), "--format", "jsonl", "--top-k", "4")
    assert code == 0 and "the bundle's initial adapter" in err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 6 and all(len(r["top"]) == 4 for r in rows)
    probs = [t["probability"] for t in rows[0]["top"]]
    assert probs == sorted(probs, reverse=True) and all(t["label"] in DIGITS for t in rows[0]["top"])
    predictor = Predictor(tiny_text_bundle, choose_adapter(tiny_text_bundle).tensors)
    first = Path(rows[0]["path"])
    expected = predictor.logits(preprocess_batch([first], tiny_text_bundle.manifest.preprocess))[0]
    assert rows[0]["top"][0]["label"] == DIGITS[int(expected.argmax())]

    code, out, _ = _run(capsys, "predict", "--bundle", b, str(root / "one"), "--format", "csv", "--top-k", "2")
    assert code == 0 and out.splitlines()[0] == "path,label_1,probability_1,label_2,probability_2"
    assert len(out.splitlines()) == 3
    code, out, _ = _run(capsys, "predict", "--bundle", b, str(root / "one" / "0.png"))
    assert code == 0 and out.splitlines()[0].split()[:3] == ["image", "top-1", "p"]

    broken = root / "one" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    code, out, err = _run(capsys, "predict", "--bundle", b, str(root / "one"), "--format", "jsonl")
    assert code == 2 and f"image {broken} cannot be decoded" in err and "--skip-bad" in err
    code, out, err = _run(capsys, "predict", "--bundle", b, str(root / "one"), "--format", "jsonl", "--skip-bad")
    assert code == 0 and len(out.splitlines()) == 2 and "1 of 3 images could not be decoded" in err


def test_predict_uses_the_agents_latest_global(tiny_text_bundle, tmp_path, capsys):
    root = image_folder(tmp_path / "img", per_class=1)
    state = tmp_path / "state"
    state.mkdir()
    tensors = adapter_of(tiny_text_bundle, seed=5, scale=0.5)
    write_adapter(tiny_text_bundle, state / GLOBAL_FILE, tensors, round_=3)
    code, out, err = _run(capsys, "predict", "--bundle", str(tiny_text_bundle.root), "--state-dir", str(state),
                          str(root), "--format", "jsonl", "--top-k", "10")
    assert code == 0 and "global adapter of round 3" in err
    got = {json.loads(line)["path"]: json.loads(line)["top"] for line in out.splitlines()}
    paths = sorted(root.rglob("*.png"))
    logits = Predictor(tiny_text_bundle, tensors).logits(preprocess_batch(paths, tiny_text_bundle.manifest.preprocess))
    for path, row in zip(paths, logits):
        probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        by_label = {t["label"]: t["probability"] for t in got[str(path)]}
        assert max(abs(by_label[c] - probs[j]) for j, c in enumerate(DIGITS)) < 1e-5

    other = tmp_path / "other.safetensors"
    other.write_bytes(adapter.encode(tensors, model_id="0" * 64, round=1, kind="global"))
    code, _, err = _run(capsys, "predict", "--bundle", str(tiny_text_bundle.root), "--adapter", str(other), str(root))
    assert code == 2 and "is for model_id 0000000000000000" in err


def test_evaluate_writes_accuracy_per_class_and_the_confusion_matrix(tiny_vision_bundle, tmp_path, capsys):
    root = image_folder(tmp_path / "img", per_class=3)
    tensors = adapter_of(tiny_vision_bundle, seed=6)
    write_adapter(tiny_vision_bundle, tmp_path / "g.safetensors", tensors)
    code, out, _ = _run(capsys, "evaluate", "--bundle", str(tiny_vision_bundle.root), "--adapter",
                        str(tmp_path / "g.safetensors"), "--data", str(root), "--out", str(tmp_path / "ev"))
    assert code == 0
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    paths = [root / c / f"{i}.png" for c in ("zero", "one", "two") for i in range(3)]
    labels = np.repeat([0, 1, 2], 3)
    pixels = preprocess_batch(paths, tiny_vision_bundle.manifest.preprocess)
    logits = Predictor(tiny_vision_bundle, tensors).logits(pixels)
    predicted = logits.argmax(axis=1)
    assert report["samples"] == 9 and report["correct"] == int((predicted == labels).sum())
    assert report["accuracy"] == pytest.approx((predicted == labels).mean())
    matrix = np.array(report["confusion"]["matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 9 and list(matrix.sum(axis=1)[:3]) == [3, 3, 3]
    for j, c in enumerate(("zero", "one", "two")):
        assert report["per_class"][c]["correct"] == int(((predicted == j) & (labels == j)).sum())
    assert report["per_class"]["nine"] == {"samples": 0, "correct": 0, "accuracy": None}
    assert report["adapter"]["round"] == 4 and "accuracy" in out
    png = tmp_path / "ev" / "confusion.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_in_text_mode_reuses_the_agents_feature_cache(tiny_text_bundle, tmp_path, capsys):
    root = image_folder(tmp_path / "img", per_class=2)
    state = tmp_path / "state"
    args = ("evaluate", "--bundle", str(tiny_text_bundle.root), "--state-dir", str(state), "--data", str(root),
            "--out", str(tmp_path / "ev"))
    assert _run(capsys, *args)[0] == 0
    first = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    from flora.edge.features import FeatureCache

    cache = FeatureCache(state / "features.sqlite")
    assert cache.count(tiny_text_bundle.manifest.model_id) == 6
    cache.close()
    assert _run(capsys, *args)[0] == 0
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["confusion"] == first["confusion"]


def test_evaluate_names_classes_the_bundle_does_not_have(tiny_text_bundle, tmp_path, capsys):
    root = image_folder(tmp_path / "img", per_class=1, classes=("zero", "lion", "Two"))
    code, _, err = _run(capsys, "evaluate", "--bundle", str(tiny_text_bundle.root), "--data", str(root),
                        "--out", str(tmp_path / "ev"))
    assert code == 2 and "['Two', 'lion']" in err and "case-sensitive" in err
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\nimg/zero/0.png,zero\nimg/lion/0.png,lion\nimg/Two/0.png,tiger\n"
                        "img/Two/0.png,lion\n")
    code, _, err = _run(capsys, "evaluate", "--bundle", str(tiny_text_bundle.root), "--data", str(csv_path),
                        "--out", str(tmp_path / "ev"))
    assert code == 2 and "2 labels are neither a class" in err and "'lion' (lines 3, 5)" in err
    assert "'tiger' (line 4)" in err
    assert not (tmp_path / "ev").exists()


def test_predict_reads_the_agents_config(tiny_text_bundle, tmp_path, capsys):
    root = image_folder(tmp_path / "img", per_class=1)
    state = tmp_path / "state"
    state.mkdir()
    write_adapter(tiny_text_bundle, state / GLOBAL_FILE, adapter_of(tiny_text_bundle, seed=7), round_=5)
    config = tmp_path / "agent.toml"
    config.write_text(f'bundle = "{tiny_text_bundle.root}"\nstate_dir = "{state}"\nbroker = "mqtt://127.0.0.1:1"\n'
                      'client_id = "pi-1"\nthreads = 1\n')
    code, out, err = _run(capsys, "predict", "--config", str(config), str(root), "--format", "jsonl")
    assert code == 0 and "global adapter of round 5" in err and len(out.splitlines()) == 3
    code, _, err = _run(capsys, "predict", "--config", str(config), "--adapter", str(tiny_text_bundle.path(ADAPTER)),
                        str(root))
    assert code == 0 and err.startswith(f"adapter: adapter {tiny_text_bundle.path(ADAPTER)}: an initial adapter")
