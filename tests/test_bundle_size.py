"""Smaller bundles: frozen weights stored once for all graphs, and `flora-export strip` for one kind of device."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from flora.edge.bundle import (
    IMAGE_ENCODER,
    INFERENCE_MODEL,
    MANIFEST,
    TRAIN_STEP_MODEL,
    load_bundle,
)
from flora.edge.trainers import open_trainer
from flora.export import cli
from flora.export.shared_data import SHARED_DATA, used_ranges
from flora.export.strip import StripError, strip_bundle

QUIET = {"say": lambda _m: None}


def _ranges(bundle, graph):
    return set(used_ranges(bundle.root, [graph]))


def test_the_step_graph_and_the_inference_model_read_one_copy_of_the_text_tower(tiny_all_bundle):
    m = tiny_all_bundle.manifest
    facts = m.onnx["shared_data"]
    assert facts["graphs"] == [IMAGE_ENCODER, INFERENCE_MODEL, TRAIN_STEP_MODEL]
    assert m.external_data == {g: (SHARED_DATA,) for g in facts["graphs"]}
    inference, step = _ranges(tiny_all_bundle, INFERENCE_MODEL), _ranges(tiny_all_bundle, TRAIN_STEP_MODEL)
    shared = inference & step
    # every large frozen tensor of the text tower: 2 blocks x (in_proj, out_proj, c_fc, c_proj, c_fc bias),
    # the projection and the prompts' embeddings
    assert len(shared) >= 12 and sum(n for _, n in shared) > 0.9 * sum(n for _, n in inference)
    assert facts["stored_bytes"] < facts["referenced_bytes"]
    data_size = tiny_all_bundle.path(SHARED_DATA).stat().st_size
    assert facts["stored_bytes"] <= data_size < facts["referenced_bytes"]
    for graph in facts["graphs"]:  # no graph keeps a large tensor inline
        inline = [t for t in onnx.load(str(tiny_all_bundle.path(graph)), load_external_data=False).graph.initializer
                  if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= 1024]
        assert inline == [], graph


def _train_and_logits(bundle, backend):
    trainer = open_trainer(bundle, backend)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    y = np.arange(8) % 10
    trainer.set_lr(1e-2)
    losses = [trainer.train_step(x, y).loss for _ in range(3)]
    return losses, trainer.logits(x)


def test_strip_keeps_what_a_step_device_uses_and_trains_the_same(tiny_all_bundle, tmp_path):
    out = tmp_path / "pi"
    manifest = strip_bundle(tiny_all_bundle.root, out, ["step"], **QUIET)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["adapter.safetensors", IMAGE_ENCODER, INFERENCE_MODEL, TRAIN_STEP_MODEL, SHARED_DATA, MANIFEST])
    stripped = load_bundle(out)
    assert stripped.manifest == manifest and manifest.backends == ("step",)
    assert manifest.model_id == tiny_all_bundle.manifest.model_id  # the same model: adapters are interchangeable
    assert manifest.created["stripped"]["backends"] == ["step"]
    assert json.loads((out / MANIFEST).read_text())["files"].keys() == manifest.files.keys()
    losses, logits = _train_and_logits(stripped, "step")
    losses0, logits0 = _train_and_logits(tiny_all_bundle, "step")
    assert np.allclose(losses, losses0, rtol=0, atol=1e-6) and np.abs(logits - logits0).max() <= 1e-6


def test_strip_to_ort_training(tiny_all_bundle, tmp_path):
    out = tmp_path / "x86"
    code = cli.main(["strip", "--backend", "ort-training", str(tiny_all_bundle.root), str(out), "-q"])
    assert code == 0
    assert not (out / TRAIN_STEP_MODEL).exists() and (out / "checkpoint").is_file()
    # in text mode the step graph reads no large tensor the inference model does not: nothing to drop
    assert (out / SHARED_DATA).stat().st_size == tiny_all_bundle.path(SHARED_DATA).stat().st_size
    losses, logits = _train_and_logits(load_bundle(out), "ort-training")
    losses0, logits0 = _train_and_logits(tiny_all_bundle, "ort-training")
    assert np.allclose(losses, losses0) and np.abs(logits - logits0).max() <= 1e-5


def test_resharing_fewer_graphs_keeps_only_the_tensors_they_read(tiny_all_bundle, tmp_path):
    import shutil

    from flora.export.shared_data import ALIGN, share_weights

    for name in (IMAGE_ENCODER, INFERENCE_MODEL, SHARED_DATA):
        shutil.copy2(tiny_all_bundle.path(name), tmp_path / name)
    facts = share_weights(tmp_path, [INFERENCE_MODEL])  # what strip does with the graphs it keeps
    kept = used_ranges(tmp_path, [INFERENCE_MODEL])
    assert facts["stored_bytes"] == sum(n for _, n in kept)
    size = (tmp_path / SHARED_DATA).stat().st_size
    assert size < tiny_all_bundle.path(SHARED_DATA).stat().st_size  # the image tower's weights are gone
    assert size <= sum(-(-n // ALIGN) * ALIGN for _, n in kept)
    assert all(o % ALIGN == 0 for o, _ in kept)
    session = ort.InferenceSession(str(tmp_path / INFERENCE_MODEL), providers=["CPUExecutionProvider"])
    from flora.edge.adapter import load_file

    feeds = {"features": np.ones((2, 64), np.float32), **load_file(tiny_all_bundle.path("adapter.safetensors")).tensors}
    original = ort.InferenceSession(str(tiny_all_bundle.path(INFERENCE_MODEL)), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, feeds)[0], original.run(None, feeds)[0])


def test_strip_refuses_what_it_cannot_do(tiny_text_bundle, tiny_all_bundle, tmp_path, capsys):
    with pytest.raises(StripError, match=r"holds backends \['ort-training'\]; it cannot keep \['step'\]"):
        strip_bundle(tiny_text_bundle.root, tmp_path / "x", ["step"], **QUIET)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    code = cli.main(["strip", "--backend", "step", str(tiny_all_bundle.root), str(tmp_path / "taken"), "-q"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    code = cli.main(["strip", "--backend", "step", str(tiny_all_bundle.root), str(tmp_path / "taken"), "--force"])
    assert code == 2 and "not a FLORA bundle" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
