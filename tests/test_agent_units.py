"""The agent's parts: state persistence, the feature cache, adapter validation, no torch on the device."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge import adapter
from edge.bundle import ADAPTER
from edge.features import FeatureCache, ImageEncoder, image_features
from edge.preprocess import preprocess_batch
from edge.state import AgentState, StateError, StateStore

REPO = Path(__file__).resolve().parents[1]


def test_state_survives_a_restart_and_tracks_the_outbox(tmp_path):
    store = StateStore(tmp_path / "state")
    state = store.load()
    assert state == AgentState() and not state.submitted(0)
    state.model_id = "m"
    store.stash_update(state, 3, b"update-bytes")
    again = StateStore(tmp_path / "state").load()
    assert again.submitted(3) and again.submitted(2) and not again.submitted(4)
    assert again.outbox_round == 3 and again.outbox_sent is False
    assert store.outbox() == b"update-bytes"
    store.mark_sent(again)
    assert StateStore(tmp_path / "state").load().outbox_sent is True
    store.save_global(b"global")
    assert store.load_global() == b"global"
    assert [p.name for p in (tmp_path / "state").iterdir() if p.name.endswith(".tmp")] == []


def test_corrupt_state_is_refused_with_the_file_named(tmp_path):
    (tmp_path / "agent-state.json").write_text("{not json")
    with pytest.raises(StateError, match=r"agent-state\.json is unreadable"):
        StateStore(tmp_path).load()


def _digit_pngs(folder: Path, n: int) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(p)
        paths.append(p)
    return paths


def test_feature_cache_recomputes_exactly_what_changed(tiny_text_bundle, tmp_path):
    paths = _digit_pngs(tmp_path / "img", 5)
    cache = FeatureCache(tmp_path / "features.sqlite")
    calls = []

    class CountingEncoder(ImageEncoder):
        def __call__(self, pixels):
            calls.append(len(pixels))
            return super().__call__(pixels)

    encoder = CountingEncoder(tiny_text_bundle)
    first = image_features(tiny_text_bundle, paths, cache, encoder=encoder)
    direct = encoder(preprocess_batch(paths, tiny_text_bundle.manifest.preprocess))
    assert np.abs(first - direct).max() <= 1e-6 and calls == [5, 5]
    calls.clear()
    again = image_features(tiny_text_bundle, paths, cache, encoder=encoder)
    np.testing.assert_array_equal(again, first)
    assert calls == []  # all from the cache, no pixels decoded
    Image.fromarray(np.full((8, 8), 200, np.uint8), mode="L").save(paths[2])  # one image changes
    changed = image_features(tiny_text_bundle, paths, cache, encoder=encoder)
    assert calls == [1]
    np.testing.assert_array_equal(np.delete(changed, 2, axis=0), np.delete(first, 2, axis=0))
    assert np.abs(changed[2] - first[2]).max() > 1e-3
    assert cache.count(tiny_text_bundle.manifest.model_id) == 6
    cache.put_many("another-model", {"abc": np.ones(64, np.float32)})
    assert cache.prune(tiny_text_bundle.manifest.model_id) == 1  # a new model invalidates the old entries
    cache.close()


def test_global_adapters_that_do_not_fit_are_refused(tiny_text_bundle):
    m = tiny_text_bundle.manifest
    good = adapter.load_file(tiny_text_bundle.path(ADAPTER)).tensors
    specs = m.trainable
    blob = adapter.encode(good, model_id=m.model_id, round=2, kind="global")
    assert adapter.decode(blob, specs, model_id=m.model_id).meta.round == 2
    foreign = adapter.encode(good, model_id="0" * 64, round=2, kind="global")
    with pytest.raises(adapter.AdapterError, match="is for model_id 0000"):
        adapter.decode(foreign, specs, model_id=m.model_id)
    missing = dict(good)
    missing.pop(next(iter(missing)))
    with pytest.raises(adapter.AdapterError, match="missing"):
        adapter.decode(adapter.encode(missing, model_id=m.model_id, round=2, kind="global"), specs)
    reshaped = {k: (v.T if k.endswith("lora_A") else v) for k, v in good.items()}
    with pytest.raises(adapter.AdapterError, match="has shape"):
        adapter.decode(adapter.encode(reshaped, model_id=m.model_id, round=2, kind="global"), specs)
    nan = {k: v.copy() for k, v in good.items()}
    next(iter(nan.values()))[0, 0] = np.nan
    with pytest.raises(adapter.AdapterError, match="NaN"):
        adapter.decode(adapter.encode(nan, model_id=m.model_id, round=2, kind="global"), specs)
    with pytest.raises(adapter.AdapterError, match="over the limit"):
        adapter.decode(blob, specs, max_bytes=len(blob) - 1)
    with pytest.raises(adapter.AdapterError):
        adapter.decode(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", specs)


NO_TORCH = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any `import torch` now fails
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    import edge.agent, edge.cli, edge.doctor, edge.evaluate
    from edge.bundle import load_bundle
    from edge.trainers import open_trainer
    bundle = load_bundle(sys.argv[2])
    for backend in sys.argv[3:]:
        t = open_trainer(bundle, backend)
        r = t.train_step(np.ones((2, 64), np.float32), np.array([0, 1]))
        print(backend, round(r.loss, 4))
    heavy = ("torch", "open_clip", "torchvision", "export")
    loaded = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in heavy)
    print("loaded", loaded)
    """
)


def test_the_agent_runs_where_import_torch_fails(tiny_all_bundle):
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(REPO), str(tiny_all_bundle.root), "ort-training",
                           "step"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("ort-training ") and lines[1].startswith("step ")
    assert float(lines[0].split()[1]) == pytest.approx(float(lines[1].split()[1]), rel=1e-4)
    assert lines[-1] == "loaded []"
