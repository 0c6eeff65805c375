"""The agent's parts: state persistence, the feature cache, adapter validation, the round loop's loss check,
config precedence, no torch on the device. The agent itself: test_agent_rules.py (its rules),
test_agent_offline.py (its behaviour on fakes), test_agent_wiring.py (on an exported bundle)."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from flora.edge import adapter
from flora.edge.bundle import Bundle
from flora.edge.features import FeatureCache, ImageEncoder, image_features, readable_image_features
from flora.edge.preprocess import ImageError, preprocess_batch
from flora.edge.state import AgentState, StateError, StateStore
from flora.edge.synthetic import random_adapter, synthetic_manifest
from flora.edge.trainers import TrainerError
from flora.edge.training import LocalData, train_round

from .fakes import FakeTrainer
from .helpers import gray_pngs


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


def test_feature_cache_recomputes_exactly_what_changed(tiny_text_bundle, tmp_path):
    paths = gray_pngs(tmp_path / "img", 5)
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


def test_global_adapters_that_do_not_fit_are_refused():
    m = synthetic_manifest()
    good = random_adapter(m, 0)
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


def test_a_non_finite_loss_from_a_backend_that_does_not_check_is_an_error(tmp_path):
    """ort-training reports a NaN loss without raising; train_round refuses it for every backend."""
    m = synthetic_manifest()
    trainer = FakeTrainer(Bundle(tmp_path, m))
    real = trainer.train_step
    trainer.train_step = lambda x, y: dataclasses.replace(real(x, y), loss=float("nan"))
    data = LocalData(np.zeros(4, np.int64), features=np.ones((4, m.feature_dim), np.float32))
    with pytest.raises(TrainerError, match=r"epoch 1 step 1 produced a non-finite loss \(nan\)"):
        train_round(trainer, data, epochs=1, batch_size=4, seed=0)
    assert trainer.steps == [4]


def test_the_round_loop_reports_each_step_with_its_batch(tmp_path):
    m = synthetic_manifest()
    trainer = FakeTrainer(Bundle(tmp_path, m))
    data = LocalData(np.arange(10) % m.num_classes, features=np.ones((10, m.feature_dim), np.float32))
    seen = []
    result = train_round(trainer, data, epochs=2, batch_size=4, seed=3, on_step=lambda idx, step: seen.append(
        (idx.tolist(), step.count)))
    assert [count for _, count in seen] == [4, 4, 2, 4, 4, 2] == trainer.steps and result.steps == 6
    for epoch in (seen[:3], seen[3:]):
        assert sorted(i for idx, _ in epoch for i in idx) == list(range(10))  # each epoch: every sample once
    assert seen[0][0] != list(range(4))  # shuffled (seeded)
    again = []
    train_round(FakeTrainer(Bundle(tmp_path, m)), data, epochs=2, batch_size=4, seed=3,
                on_step=lambda idx, step: again.append((idx.tolist(), step.count)))
    assert again == seen


NO_TORCH = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any `import torch` now fails
    import numpy as np
    import flora.edge.agent, flora.edge.cli, flora.edge.doctor, flora.edge.evaluate
    from flora.edge.bundle import load_bundle
    from flora.edge.trainers import open_trainer
    bundle = load_bundle(sys.argv[1])
    for backend in sys.argv[2:]:
        t = open_trainer(bundle, backend)
        r = t.train_step(np.ones((2, 64), np.float32), np.array([0, 1]))
        print(backend, round(r.loss, 4))
    heavy = ("torch", "open_clip", "torchvision", "flora.export")
    loaded = sorted(m for m, mod in sys.modules.items()
                    if mod is not None and (m.split(".")[0] in heavy or m.startswith("flora.export")))
    print("loaded", loaded)
    """
)


def test_the_agent_runs_where_import_torch_fails(tiny_all_bundle):
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(tiny_all_bundle.root), "ort-training", "step"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("ort-training ") and lines[1].startswith("step ")
    assert float(lines[0].split()[1]) == pytest.approx(float(lines[1].split()[1]), rel=1e-4)
    assert lines[-1] == "loaded []"


# -- state: records per run, the applied global ----------------------------------------------------

def test_state_records_the_applied_global_and_starts_a_fresh_record_per_run(tmp_path):
    store = StateStore(tmp_path)
    state = AgentState(model_id="m", federation="fed", run_id="run-a")
    store.record_global(state, b"global-bytes", 4, "ab" * 32)
    again = store.load()
    assert (again.global_round, again.global_sha256) == (4, "ab" * 32) and store.load_global() == b"global-bytes"
    store.stash_update(again, 4, b"update")
    assert again.outbox_pending and again.submitted(4)
    store.start_run(again, "fed", "run-b")
    fresh = store.load()
    assert fresh.run_id == "run-b" and fresh.federation == "fed"
    assert not fresh.submitted(0) and not fresh.outbox_pending and store.outbox() is None
    assert (fresh.global_round, fresh.global_sha256) == (4, "ab" * 32)  # the deployed global stays


# -- progress lines ---------------------------------------------------------------------------------

def test_feature_extraction_logs_progress_lines(tiny_text_bundle, tmp_path, caplog):
    paths = gray_pngs(tmp_path / "img", 5)
    calls = []
    with caplog.at_level(logging.INFO, logger="flora.edge.features"):
        image_features(tiny_text_bundle, paths, batch_size=2, progress_every_s=0.0,
                       progress=lambda done, total: calls.append((done, total)))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("image features: ")]
    assert [line.split(" images")[0] for line in lines] == ["image features: 2/5", "image features: 4/5",
                                                             "image features: 5/5"]
    assert all("img/s" in line for line in lines) and calls == [(2, 5), (4, 5), (5, 5)]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flora.edge.features"):
        image_features(tiny_text_bundle, gray_pngs(tmp_path / "more", 5), batch_size=2, progress_every_s=3600)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("image features: ")]
    assert [line.split(" images")[0] for line in lines] == ["image features: 5/5"]  # only the last, when slow


def test_readable_image_features_skip_broken_files(tiny_text_bundle, tmp_path):
    paths = gray_pngs(tmp_path / "img", 4)
    paths[1].write_bytes(b"broken")
    copy = tmp_path / "img" / "copy.png"
    copy.write_bytes(b"broken")  # the same content: one decode attempt, both left out
    feats, bad = readable_image_features(tiny_text_bundle, [*paths, copy, tmp_path / "gone.png"], batch_size=8)
    assert sorted(bad) == [1, 4, 5] and feats.shape == (3, tiny_text_bundle.manifest.feature_dim)
    assert "cannot be decoded" in bad[1] and "cannot read it" in bad[5]
    direct = image_features(tiny_text_bundle, [paths[0], paths[2], paths[3]])
    np.testing.assert_allclose(feats, direct, atol=1e-6)
    with pytest.raises(ImageError, match=r"1\.png cannot be decoded"):
        image_features(tiny_text_bundle, paths)


# -- config precedence ------------------------------------------------------------------------------

def test_explicit_command_line_values_win_over_the_config_file(tmp_path, monkeypatch):
    from flora.edge import cli

    config = tmp_path / "agent.toml"
    config.write_text('bundle = "/b"\ndata = "/d"\nbroker = "mqtt://toml:1883"\nclient_id = "from-toml"\n'
                      'federation = "toml-fed"\nval_fraction = 0.3\nseed = 7\nshots = 5\nfp16_updates = true\n'
                      'log_level = "WARNING"\n')
    seen = []
    monkeypatch.setattr(cli, "run_agent", lambda args: seen.append(args) or 0)
    argv = ["--config", str(config), "--client-id", "dev-cli", "--federation", "default", "--val-fraction", "0.1",
            "--seed", "0", "--log-level", "INFO"]
    assert cli.main(argv) == 0
    args = seen[0]
    # given on the command line, even with the parser's default value: the command line wins
    assert (args.client_id, args.federation, args.val_fraction, args.seed, args.log_level) == (
        "dev-cli", "default", 0.1, 0, "INFO")
    # not given: the config file's values
    assert (str(args.bundle), args.broker, args.shots, args.fp16_updates) == ("/b", "mqtt://toml:1883", 5, True)
    assert cli.main(["run", "--config", str(config)]) == 0
    assert (seen[1].federation, seen[1].seed, seen[1].val_fraction) == ("toml-fed", 7, 0.3)


def test_explicit_options_sees_given_values_equal_to_defaults():
    from flora.edge import cli
    from flora.edge.config import explicit_options

    parser = cli.build_parser()
    run = parser.commands["run"]
    assert explicit_options(run, ["--seed", "0", "--fp16-updates", "--val-frac", "0.1"]) == {
        "seed", "fp16_updates", "val_fraction"}
    assert explicit_options(run, []) == set()
    assert "after the --val-fraction" in " ".join(run.format_help().split())
