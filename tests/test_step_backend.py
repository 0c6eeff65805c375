"""The portable `step` backend: one plain ONNX graph per training step, equal to ORT and PyTorch."""

from __future__ import annotations

import json
import subprocess
import textwrap
import venv
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import pytest
import torch

from flora.edge.adapter import load_file
from flora.edge.bundle import ADAPTER, TRAIN_STEP_MODEL, load_bundle
from flora.edge.trainers import available_backends, open_trainer
from flora.edge.trainers.base import TrainerError
from flora.export.graphs import FeatureClassifier, tokenize_prompts
from flora.export.loading import WeightsSource, build_model
from flora.export.lora import LoraSpec, attach_lora, load_lora_
from flora.export.onnx_export import TESTED_ONNXRUNTIME
from flora.export.presets import get_preset

from .helpers import DIGITS, LR, assert_same_adapter, batches, export_tiny, install_wheel, run_backend


def run_pytorch(bundle, data, preset: str = "clip-tiny", weight_decay: float = 0.0, lr: float = LR):
    """torch.optim.AdamW on the same LoRA model, from the bundle's initial adapter."""
    model = build_model(get_preset(preset), WeightsSource("random-init", None, None, False, 0))
    params = attach_lora(model, LoraSpec("text", rank=8, alpha=16.0))
    start = load_file(bundle.path(ADAPTER)).tensors
    load_lora_(params, {k: torch.from_numpy(v) for k, v in start.items()})
    arch = get_preset(preset).architecture
    clf = FeatureClassifier(model, tokenize_prompts(DIGITS, "a photo of a {}.", arch))
    opt = torch.optim.AdamW(params.values(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(clf(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {k: p.detach().numpy().copy() for k, p in params.items()}, np.array(losses)


def test_step_graph_uses_only_standard_onnx_ops(tiny_all_bundle):
    model = onnx.load(str(tiny_all_bundle.path(TRAIN_STEP_MODEL)))
    domains = {n.domain for n in model.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert model.ir_version == 8
    assert tiny_all_bundle.manifest.onnx["step_opset"] == 18
    assert tiny_all_bundle.manifest.backends == ("ort-training", "step")


def test_zero_b_first_step_is_finite_and_equals_pytorch(tiny_all_bundle):
    data = batches(64, steps=1)
    step_adapter, step_loss = run_backend(tiny_all_bundle, "step", data)
    torch_adapter, torch_loss = run_pytorch(tiny_all_bundle, data)
    initial = load_file(tiny_all_bundle.path(ADAPTER)).tensors
    for name, arr in step_adapter.items():
        assert np.isfinite(arr).all(), name
        if name.endswith("lora_A"):  # B = 0 means A's gradient is exactly 0: A must not move at all
            np.testing.assert_array_equal(arr, initial[name])
    assert_same_adapter(step_adapter, torch_adapter, rtol=0, atol=1e-6)
    np.testing.assert_allclose(step_loss, torch_loss, rtol=1e-5)


def test_twenty_steps_of_step_ort_training_and_pytorch_agree(tiny_all_bundle):
    data = batches(64)
    step_adapter, step_losses = run_backend(tiny_all_bundle, "step", data)
    ort_adapter, ort_losses = run_backend(tiny_all_bundle, "ort-training", data)
    torch_adapter, torch_losses = run_pytorch(tiny_all_bundle, data)
    assert_same_adapter(step_adapter, ort_adapter)
    assert_same_adapter(step_adapter, torch_adapter)
    np.testing.assert_allclose(step_losses, ort_losses, rtol=1e-3)
    np.testing.assert_allclose(step_losses, torch_losses, rtol=1e-3)
    assert step_losses[-4:].mean() < 0.6 * step_losses[:4].mean()  # it learned
    initial = load_file(tiny_all_bundle.path(ADAPTER)).tensors
    assert all(not np.array_equal(step_adapter[k], initial[k]) for k in initial)


def test_weight_decay_is_an_input_of_the_step_graph(tiny_all_bundle):
    data = batches(64, steps=5)
    decayed, _ = run_backend(tiny_all_bundle, "step", data, weight_decay=0.1)
    torch_decayed, _ = run_pytorch(tiny_all_bundle, data, weight_decay=0.1)
    plain, _ = run_backend(tiny_all_bundle, "step", data, weight_decay=0.0)
    assert_same_adapter(decayed, torch_decayed)
    assert max(np.abs(decayed[k] - plain[k]).max() for k in plain) > 1e-5


def test_batch_size_is_dynamic_and_state_carries_over(tiny_all_bundle):
    trainer = open_trainer(tiny_all_bundle, "step")
    for n in (1, 3, 16):
        x = np.ones((n, 64), np.float32)
        result = trainer.train_step(x, np.zeros(n, np.int64))
        assert result.count == n and np.isfinite(result.loss)
    assert trainer.steps == 3
    state = trainer.optimizer_state()
    assert any(np.abs(v).max() > 0 for k, v in state.items() if k.startswith("adam_v."))
    with pytest.raises(TrainerError, match="expected \\[2, 64\\]"):
        trainer.train_step(np.ones((2, 63), np.float32), np.zeros(2, np.int64))


def test_every_session_of_a_process_allocates_from_one_shared_arena(tiny_all_bundle):
    from flora.edge.ort import import_onnxruntime, share_cpu_arena

    ort = import_onnxruntime()
    first, second = ort.SessionOptions(), ort.SessionOptions()
    assert share_cpu_arena(first) and share_cpu_arena(second)  # registered once, used by both
    assert first.get_session_config_entry("session.use_env_allocators") == "1"
    data = batches(64, steps=3)
    first_losses, again = (run_backend(tiny_all_bundle, "step", data)[1] for _ in range(2))
    np.testing.assert_array_equal(first_losses, again)  # one arena for all, the same arithmetic


def test_auto_backend_prefers_ort_training_and_a_step_only_bundle_uses_step(tiny_all_bundle, tmp_path):
    assert available_backends(tiny_all_bundle) == ["ort-training", "step"]
    assert open_trainer(tiny_all_bundle).name == "ort-training"
    step_only = export_tiny(tmp_path / "step-only", backends=("step",))
    assert available_backends(step_only) == ["step"]
    assert open_trainer(step_only).name == "step"
    assert not step_only.path("checkpoint").exists()
    with pytest.raises(TrainerError, match=r"not exported with it .*--backend ort-training or --backend all"):
        open_trainer(step_only, "ort-training")


def test_a_bundle_without_the_devices_backend_says_which_flag_to_export_with(tiny_text_bundle, monkeypatch):
    from flora.edge.trainers.ort_training import OrtTrainingTrainer

    monkeypatch.setattr(OrtTrainingTrainer, "runs_here", classmethod(lambda cls: False))  # a Raspberry Pi
    with pytest.raises(TrainerError) as info:
        open_trainer(tiny_text_bundle)
    message = str(info.value)
    assert "\n" not in message and "holds only the ort-training backend, which cannot train here" in message
    assert message.endswith("export it with flora-export --backend all (the default) or --backend step")


# --- a device with plain onnxruntime only -------------------------------------------------------

PLAIN_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    sys.path.insert(0, sys.argv[1])
    assert importlib.util.find_spec("torch") is None, "torch is importable"
    assert importlib.util.find_spec("onnxruntime.training") is None, "onnxruntime-training is importable"
    import numpy as np, onnxruntime
    import flora.edge
    assert flora.edge.__file__.startswith(sys.argv[1]), flora.edge.__file__  # the installed wheel
    from flora.edge.bundle import load_bundle
    from flora.edge.trainers import available_backends, open_trainer
    bundle = load_bundle(sys.argv[2])
    data = np.load(sys.argv[3])
    trainer = open_trainer(bundle)
    trainer.set_lr(float(sys.argv[5]))
    losses = [trainer.train_step(data[f"x{i}"], data[f"y{i}"]).loss for i in range(int(data["n"]))]
    np.savez(sys.argv[4], **trainer.get_adapter())
    print(json.dumps({"backends": available_backends(bundle), "trainer": trainer.name, "losses": losses,
                      "onnxruntime": onnxruntime.__version__}))
    """
)


#: The plain onnxruntime builds the step backend is tested on: the newest release (what a Raspberry Pi
#: gets from `pip install onnxruntime`), and the floor the edge extra admits, which is as old as the
#: onnxruntime-gpu wheels NVIDIA builds for JetPack 5 (built against numpy 1.x).
PLAIN_RUNTIMES = {
    "newest": [f"onnxruntime=={TESTED_ONNXRUNTIME['onnxruntime']}", "numpy"],
    "floor": [f"onnxruntime=={TESTED_ONNXRUNTIME['onnxruntime-oldest']}", "numpy<2"],
}
UNREACHABLE = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
               "Connection refused", "ConnectTimeoutError")


def plain_onnxruntime_python(cache: Path, packages: Sequence[str]) -> Path:
    """A venv with `packages` (an onnxruntime and numpy) and the edge extra's other packages, and
    neither torch nor onnxruntime-training (built once, then reused from the pytest cache)."""
    python = cache / "bin" / "python"
    marker = cache / ".complete"
    if marker.exists() and marker.read_text() == " ".join(packages):
        return python
    venv.EnvBuilder(with_pip=True, clear=True).create(cache)
    cmd = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages,
           "safetensors", "pillow", "paho-mqtt>=2,<3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        if any(sign in proc.stderr for sign in UNREACHABLE):
            pytest.skip(f"the package registry cannot be reached to build a plain-onnxruntime venv:\n"
                        f"{proc.stderr[-800:]}")
        raise AssertionError(f"pip failed:\n{proc.stderr[-2000:]}")
    marker.write_text(" ".join(packages))
    return python


@pytest.mark.parametrize("runtime", sorted(PLAIN_RUNTIMES))
def test_step_backend_runs_with_plain_onnxruntime_and_no_torch(runtime, tiny_all_bundle, tmp_path, request,
                                                               flora_wheel):
    packages = PLAIN_RUNTIMES[runtime]
    python = plain_onnxruntime_python(Path(request.config.cache.mkdir(f"flora-plain-onnxruntime-{runtime}")),
                                      packages)
    site = tmp_path / "site"  # the project as a device installs it: the wheel, not this checkout
    install_wheel(flora_wheel, site)
    data = batches(64)
    npz = tmp_path / "batches.npz"
    np.savez(npz, n=len(data), **{f"x{i}": x for i, (x, _) in enumerate(data)},
             **{f"y{i}": y for i, (_, y) in enumerate(data)})
    out = tmp_path / "adapter.npz"
    proc = subprocess.run(
        [str(python), "-I", "-c", PLAIN_SCRIPT, str(site), str(tiny_all_bundle.root), str(npz), str(out), str(LR)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["onnxruntime"] == packages[0].split("==")[1]
    assert report["backends"] == ["step"] and report["trainer"] == "step"
    got = dict(np.load(out))
    ort_adapter, ort_losses = run_backend(tiny_all_bundle, "ort-training", data)
    assert_same_adapter(got, ort_adapter)
    np.testing.assert_allclose(report["losses"], ort_losses, rtol=1e-3)


@pytest.mark.slow
def test_vitb32_twenty_steps_of_step_ort_training_and_pytorch_agree(tmp_path):
    """Random-init ViT-B/32 at a realistic LoRA learning rate (1e-4).

    Adam moves every element by about lr per step whatever its gradient's size, so elements whose
    gradient is at float32 noise level move by +-lr in an implementation-dependent direction; the
    disagreement between three correct fp32 implementations therefore scales with lr (measured: up to
    3.5e-4 after 20 steps at lr 5e-3 on this 12-block tower, 10.5 % of elements past 1e-3/1e-5; at
    lr 1e-4, 1 element of 393,216 past it, by 4.8e-5). So: at most 0.01 % of elements may fall outside
    rtol 1e-3 / atol 1e-5, and none by more than lr.
    """
    from flora.export.pipeline import ExportOptions, export_bundle

    out = tmp_path / "vitb32"
    export_bundle(ExportOptions(preset="clip-vitb32", classes=DIGITS, out=out, random_init=True,
                                backends=("ort-training", "step")), say=lambda m: None)
    bundle = load_bundle(out)
    data = batches(512, n=8)
    lr = 1e-4
    step_adapter, step_losses = run_backend(bundle, "step", data, lr=lr)
    ort_adapter, ort_losses = run_backend(bundle, "ort-training", data, lr=lr)
    torch_adapter, torch_losses = run_pytorch(bundle, data, preset="clip-vitb32", lr=lr)
    assert_same_adapter(step_adapter, ort_adapter, max_outside=1e-4, outside_bound=lr)
    assert_same_adapter(step_adapter, torch_adapter, max_outside=1e-4, outside_bound=lr)
    np.testing.assert_allclose(step_losses, ort_losses, rtol=1e-3)
    np.testing.assert_allclose(step_losses, torch_losses, rtol=1e-3)
    initial = load_file(bundle.path(ADAPTER)).tensors
    moved = max(np.abs(step_adapter[k] - initial[k]).max() for k in initial)
    assert moved > 100 * 1e-5  # the tolerance is far below what training moved
    assert step_losses[-4:].mean() < step_losses[:4].mean()


@pytest.mark.parametrize("tower", ["vision", "both"])
def test_pixel_towers_step_graph_keeps_a_dynamic_batch_and_equals_ort(tmp_path, tower):
    bundle = export_tiny(tmp_path / tower, tower=tower, backends=("ort-training", "step"))
    step, ort_trainer = open_trainer(bundle, "step"), open_trainer(bundle, "ort-training")
    rng = np.random.default_rng(0)
    for n in (1, 5, 19, 8):  # 19: the size the graph was traced at must not be the only one it takes
        x = rng.standard_normal(bundle.manifest.input_shape(n)).astype(np.float32)
        y = rng.integers(0, 10, n)
        a, b = step.train_step(x, y), ort_trainer.train_step(x, y)
        assert a.count == n and a.loss == pytest.approx(b.loss, rel=1e-4)
    assert_same_adapter(step.get_adapter(), ort_trainer.get_adapter())
    dims = onnx.load(str(bundle.path(TRAIN_STEP_MODEL))).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]


def test_step_evaluation_uses_the_step_graph_at_lr_zero_and_changes_nothing(tiny_all_bundle):
    from flora.edge.trainers.base import score_logits

    trainer = open_trainer(tiny_all_bundle, "step")
    x, y = batches(64, steps=1)[0]
    trainer.set_lr(5e-3)
    trainer.train_step(x, y)
    before, moments, steps = trainer.get_adapter(), trainer.optimizer_state(), trainer.steps
    result = trainer.evaluate_batch(x, y)
    reference = score_logits(trainer.logits(x), y)  # the inference model with the same adapter
    assert result.correct == reference.correct and result.loss == pytest.approx(reference.loss, rel=1e-5)
    assert trainer.steps == steps
    assert_same_adapter(trainer.get_adapter(), before, rtol=0, atol=0)
    assert_same_adapter(trainer.optimizer_state(), moments, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["ort-training", "step"])
def test_reset_optimizer_starts_adamw_afresh_and_keeps_the_adapter(tiny_all_bundle, backend):
    m = tiny_all_bundle.manifest
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, m.feature_dim)).astype(np.float32)
    y = np.array([0, 1, 2, 3])
    trained = open_trainer(tiny_all_bundle, backend)
    trained.set_lr(1e-2)
    for _ in range(3):
        trained.train_step(x, y)
    adapter = trained.get_adapter()
    continued = open_trainer(tiny_all_bundle, backend)  # the same three steps, its moments kept
    continued.set_lr(1e-2)
    for _ in range(3):
        continued.train_step(x, y)
    trained.reset_optimizer()
    after = trained.get_adapter()
    assert all(np.array_equal(after[k], adapter[k]) for k in adapter) and trained.lr == 1e-2
    fresh = open_trainer(tiny_all_bundle, backend)  # a new trainer from the same adapter: zero moments
    fresh.set_lr(1e-2)
    fresh.set_adapter(adapter)
    for trainer in (trained, fresh, continued):
        trainer.train_step(x, y)
    reset_step, fresh_step, moment_step = trained.get_adapter(), fresh.get_adapter(), continued.get_adapter()
    for name in adapter:
        np.testing.assert_allclose(reset_step[name], fresh_step[name], rtol=0, atol=1e-7)
    assert max(float(np.abs(moment_step[k] - fresh_step[k]).max()) for k in adapter) > 1e-5  # moments matter


def test_each_backend_says_whether_it_can_change_the_weight_decay(tiny_all_bundle):
    assert open_trainer(tiny_all_bundle, "step").set_weight_decay(0.1) is True
    ort_trainer = open_trainer(tiny_all_bundle, "ort-training")
    assert ort_trainer.set_weight_decay(0.0) is True  # the exported value
    assert ort_trainer.set_weight_decay(0.1) is False and ort_trainer.weight_decay == 0.0
