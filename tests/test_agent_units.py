"""The agent's parts: state persistence, the feature cache, adapter validation, no torch on the device."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Tuple

import numpy as np
import pytest
from PIL import Image

from flora.edge import adapter
from flora.edge.agent import Agent, AgentConfig
from flora.edge.bundle import ADAPTER
from flora.edge.dataset import DatasetError
from flora.edge.features import FeatureCache, ImageEncoder, image_features, readable_image_features
from flora.edge.fileio import sha256_bytes
from flora.edge.mqtt import BrokerConfig
from flora.edge.preprocess import ImageError, preprocess_batch
from flora.edge.protocol import RoundAnnouncement, Status, TrainConfig
from flora.edge.state import AgentState, StateError, StateStore
from flora.edge.trainers import TrainerError


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


# -- the agent, driven without a broker ------------------------------------------------------------

class FakeClient:
    """Stands in for paho in Agent: records publishes and acknowledges them, except on held topic kinds."""

    def __init__(self) -> None:
        self.published: List[Tuple[str, bytes, bool]] = []
        self.hold: set = set()  # topic kinds ("update", ...) whose publishes are not acknowledged
        self.on_publish = None
        self._mid = 0

    def publish(self, topic, payload=None, qos=0, retain=False):
        self._mid += 1
        self.published.append((topic, bytes(payload or b""), retain))
        if topic.split("/")[2] not in self.hold:
            self.ack(self._mid)
        return SimpleNamespace(mid=self._mid, rc=0)

    def ack(self, mid: int) -> None:
        self.on_publish(self, None, mid, None, None)

    def of(self, kind: str) -> List[bytes]:
        return [p for t, p, _ in self.published if t.split("/")[2] == kind]

    def statuses(self) -> List[Status]:
        return [Status.from_json(p) for p in self.of("status")]


def make_agent(bundle, data: Path, state_dir: Path, **overrides) -> Tuple[Agent, FakeClient]:
    cfg = AgentConfig(bundle=bundle.root, data=data, broker=BrokerConfig.from_url("mqtt://127.0.0.1:1"),
                      client_id="dev-1", federation="fed", state_dir=state_dir, val_fraction=0.25, progress_every_s=0.0,
                      publish_timeout_s=0.2)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    agent = Agent(cfg)
    fake = FakeClient()
    fake.on_publish = agent._acks.on_publish
    agent.client = fake
    return agent, fake


def class_folders(root: Path, counts: Dict[str, int], seed: int = 0) -> Path:
    """PNG images of random content (so each has its own hash), one folder per class."""
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels, mode="RGB").save(root / name / f"{i:02d}.png")
    return root


def offer_round(agent: Agent, round_: int, run_id: str = "run-a", protocol: int = 1, tensors=None,
                epochs: int = 1) -> bytes:
    """Queue `global` and `round` for a round, as the broker delivers the retained messages."""
    m = agent.manifest
    tensors = tensors if tensors is not None else adapter.load_file(agent.bundle.path(ADAPTER)).tensors
    blob = adapter.encode(tensors, model_id=m.model_id, round=round_, kind="global")
    ann = RoundAnnouncement(round_, m.model_id, "training", TrainConfig(epochs=epochs, lr=5e-3, batch_size=4), "all",
                            time.time() + 600, sha256_bytes(blob), 5, protocol=protocol, run_id=run_id)
    agent.events.put(("global", blob))
    agent.events.put(("round", ann.to_json()))
    return blob


def updates(agent: Agent, fake: FakeClient) -> List[adapter.Adapter]:
    return [adapter.decode(p, agent.manifest.trainable) for p in fake.of("update")]


@pytest.fixture
def digits_folder(tmp_path):
    return class_folders(tmp_path / "data", {"zero": 8, "one": 8, "two": 8})


def test_agent_submits_exactly_its_training_split_size(tiny_text_bundle, digits_folder, tmp_path):
    agent, fake = make_agent(tiny_text_bundle, digits_folder, tmp_path / "state")
    offer_round(agent, 0)
    agent.pump()
    (update,) = updates(agent, fake)
    assert update.meta.round == 0 and update.meta.num_samples == 18  # 24 images, 25 % (2 per class) held out
    metrics = json.loads(fake.of("metrics")[0])
    assert metrics["samples"] == 18 and metrics["steps"] == 5  # ceil(18 / 4)
    assert StateStore(tmp_path / "state").load().outbox_sent is True


def test_a_failing_round_is_reported_once_and_the_next_round_trains(tiny_text_bundle, digits_folder, tmp_path,
                                                                     caplog):
    agent, fake = make_agent(tiny_text_bundle, digits_folder, tmp_path / "state")
    broken = agent.trainer

    def non_finite(inputs, labels):
        raise TrainerError("training step 1 produced a non-finite loss (nan)")

    broken.train_step = non_finite
    trained = []
    real_train = agent.train
    agent.train = lambda r: (trained.append(r.round), real_train(r))
    blob = offer_round(agent, 0)
    with caplog.at_level(logging.INFO, logger="flora.agent"):
        assert agent.pump() is True  # the agent keeps running
        error = fake.statuses()[-1]
        assert error.state == "error" and "non-finite loss" in error.last_error and error.round == 0
        assert fake.of("update") == [] and trained == [0]
        state = StateStore(tmp_path / "state").load()
        assert state.last_submitted_round is None
        assert (state.global_round, state.global_sha256) == (0, sha256_bytes(blob))  # saved when applied
        offer_round(agent, 0)  # the retained round again (a reconnect): not retried in this process
        agent.pump()
        agent.pump()
        assert trained == [0] and fake.of("update") == []
        assert caplog.text.count("round 0 failed in this process: not retrying it") == 1
    assert agent.trainer is not broken  # ort-training reopened: a NaN step may have poisoned AdamW's moments
    offer_round(agent, 1)
    agent.pump()
    assert trained == [0, 1] and [u.meta.round for u in updates(agent, fake)] == [1]
    assert fake.statuses()[-1].state == "idle"


def test_non_finite_loss_from_a_backend_that_does_not_check_is_an_error(tiny_text_bundle):
    from flora.edge.trainers import open_trainer
    from flora.edge.training import LocalData, train_round

    trainer = open_trainer(tiny_text_bundle, "ort-training")
    real = trainer.train_step
    trainer.train_step = lambda x, y: dataclasses.replace(real(x, y), loss=float("nan"))
    data = LocalData(np.zeros(4, np.int64), features=np.ones((4, tiny_text_bundle.manifest.feature_dim), np.float32))
    with pytest.raises(TrainerError, match=r"epoch 1 step 1 produced a non-finite loss \(nan\)"):
        train_round(trainer, data, epochs=1, batch_size=4, seed=0)


def test_an_update_in_flight_is_never_published_twice(tiny_text_bundle, digits_folder, tmp_path):
    agent, fake = make_agent(tiny_text_bundle, digits_folder, tmp_path / "state")
    fake.hold.add("update")  # the broker's ack does not come within publish_timeout_s
    offer_round(agent, 0)
    agent.pump()
    assert len(fake.of("update")) == 1
    store = StateStore(tmp_path / "state")
    assert store.load().outbox_pending and store.load().submitted(0)
    agent.events.put(("connected", b""))  # a reconnect: paho re-sends its queued message itself
    offer_round(agent, 0)  # and the broker re-delivers the retained messages
    agent.pump()
    assert len(fake.of("update")) == 1  # not again from the outbox
    assert store.load().outbox_pending
    update_mid = next(i for i, (t, _, _) in enumerate(fake.published, start=1) if t.endswith("/update/dev-1"))
    fake.ack(update_mid)  # paho reports it published after the reconnect
    agent.pump()
    assert store.load().outbox_sent is True and len(fake.of("update")) == 1


def test_restarted_agent_resends_the_stored_update_once_and_does_not_train(tiny_text_bundle, digits_folder,
                                                                           tmp_path):
    store = StateStore(tmp_path / "state")
    stored = adapter.encode(adapter.load_file(tiny_text_bundle.path(ADAPTER)).tensors,
                            model_id=tiny_text_bundle.manifest.model_id, round=0, kind="update", client_id="dev-1",
                            num_samples=7)
    state = AgentState(client_id="dev-1", model_id=tiny_text_bundle.manifest.model_id, federation="fed",
                       run_id="run-a")
    store.stash_update(state, 0, stored)  # a crash came before the broker's ack
    agent, fake = make_agent(tiny_text_bundle, digits_folder, tmp_path / "state")
    agent.trainer.train_step = lambda *a: pytest.fail("round 0 must not be trained again")
    agent.events.put(("connected", b""))
    offer_round(agent, 0)
    agent.pump()
    agent.events.put(("connected", b""))
    offer_round(agent, 0)
    agent.pump()
    assert fake.of("update") == [stored]
    assert store.load().outbox_sent is True


def test_the_record_of_submitted_rounds_holds_for_one_run_and_federation(tiny_text_bundle, digits_folder, tmp_path,
                                                                        caplog):
    store = StateStore(tmp_path / "state")
    state = AgentState(client_id="dev-1", model_id=tiny_text_bundle.manifest.model_id, federation="fed",
                       run_id="run-a")
    store.stash_update(state, 3, b"old-update")
    store.mark_sent(state)
    agent, fake = make_agent(tiny_text_bundle, digits_folder, tmp_path / "state")
    offer_round(agent, 2, run_id="run-a")  # the same run: already submitted
    agent.pump()
    assert fake.of("update") == []
    offer_round(agent, 2, run_id="")  # an older aggregator without run ids: today's rule
    agent.pump()
    assert fake.of("update") == []
    with caplog.at_level(logging.INFO, logger="flora.agent"):
        offer_round(agent, 0, run_id="run-b")  # a federation started afresh: round 0 again
        agent.pump()
    assert [u.meta.round for u in updates(agent, fake)] == [0]
    assert "federation run run-b (the record was for run run-a): forgetting that rounds up to 3" in caplog.text
    after = store.load()
    assert after.run_id == "run-b" and after.last_submitted_round == 0

    # another federation with the same state dir starts a fresh record too
    other, fake2 = make_agent(tiny_text_bundle, digits_folder, tmp_path / "state", federation="other-fed")
    assert store.load().last_submitted_round is None and store.load().federation == "other-fed"
    offer_round(other, 0, run_id="")
    other.pump()
    assert [u.meta.round for u in updates(other, fake2)] == [0]


def test_round_messages_of_a_newer_protocol_are_refused_once(tiny_text_bundle, digits_folder, tmp_path, caplog):
    agent, fake = make_agent(tiny_text_bundle, digits_folder, tmp_path / "state")
    with caplog.at_level(logging.INFO, logger="flora.agent"):
        offer_round(agent, 0, protocol=2)
        agent.pump()
        offer_round(agent, 0, protocol=2)
        assert agent.pump() is True
    assert caplog.text.count("refused a round message of protocol 2, newer than this agent's 1") == 1
    assert fake.of("update") == [] and agent.round is None
    assert [s.state for s in fake.statuses()] == ["error"]
    offer_round(agent, 0, protocol=1)
    agent.pump()
    assert [u.meta.round for u in updates(agent, fake)] == [0]


def test_unreadable_images_are_left_out_with_one_warning(tiny_text_bundle, digits_folder, tmp_path, caplog):
    (digits_folder / "one" / "03.png").write_bytes(b"not a png")
    (digits_folder / "two" / "05.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with caplog.at_level(logging.WARNING):
        agent, _ = make_agent(tiny_text_bundle, digits_folder, tmp_path / "state")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("2 of 24 images cannot be read and are left out: ")
    assert "one/03.png" in warnings[0] and "two/05.png" in warnings[0]
    assert len(agent.train_data) + len(agent.val_data) == 22
    assert agent.train_data.features.shape == (len(agent.train_data), tiny_text_bundle.manifest.feature_dim)
    for path in digits_folder.rglob("*.png"):
        path.write_bytes(b"broken")
    with pytest.raises(DatasetError, match=r"none of the training images under .* can be read"):
        make_agent(tiny_text_bundle, digits_folder, tmp_path / "state")


def test_the_feature_cache_drops_other_models_at_startup(tiny_text_bundle, digits_folder, tmp_path, caplog):
    cache = FeatureCache(tmp_path / "state" / "features.sqlite")
    cache.put_many("another-model", {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)})
    cache.close()
    with caplog.at_level(logging.INFO, logger="flora.agent"):
        make_agent(tiny_text_bundle, digits_folder, tmp_path / "state")
    cache = FeatureCache(tmp_path / "state" / "features.sqlite")
    assert cache.count("another-model") == 0 and cache.count(tiny_text_bundle.manifest.model_id) == 24
    cache.close()
    assert "feature cache: dropped 2 entries of other models" in caplog.text


def test_vision_mode_agent_trains_from_pixels(tiny_vision_bundle, digits_folder, tmp_path):
    agent, fake = make_agent(tiny_vision_bundle, digits_folder, tmp_path / "state")
    assert agent.train_data.features is None and len(agent.train_data.paths) == 18
    assert not (tmp_path / "state" / "features.sqlite").exists()
    initial = adapter.load_file(tiny_vision_bundle.path(ADAPTER)).tensors
    evaluated = []
    real_evaluate = agent.trainer.evaluate_batch
    agent.trainer.evaluate_batch = lambda x, y: evaluated.append(len(x)) or real_evaluate(x, y)
    offer_round(agent, 0, tensors=initial, epochs=2)
    agent.pump()
    assert evaluated == [4, 2]  # the 6 validation images at the round's batch size, not all at once
    (update,) = updates(agent, fake)
    assert update.meta.num_samples == 18 and update.meta.kind == "update"
    assert any(name.startswith("visual") or "vision" in name for name in update.tensors)
    moved = max(float(np.abs(update.tensors[k] - initial[k]).max()) for k in initial)
    assert moved > 1e-4
    assert json.loads(fake.of("metrics")[0])["steps"] == 10  # 2 epochs of ceil(18 / 4)


def test_vision_mode_image_broken_during_a_round_is_a_round_error(tiny_vision_bundle, digits_folder, tmp_path):
    agent, fake = make_agent(tiny_vision_bundle, digits_folder, tmp_path / "state")
    Path(agent.train_data.paths[0]).write_bytes(b"garbage")  # after the startup check
    offer_round(agent, 0)
    assert agent.pump() is True
    error = fake.statuses()[-1]
    assert error.state == "error" and "cannot be decoded" in error.last_error
    assert fake.of("update") == []


# -- progress lines ---------------------------------------------------------------------------------

def test_feature_extraction_logs_progress_lines(tiny_text_bundle, tmp_path, caplog):
    paths = _digit_pngs(tmp_path / "img", 5)
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
        image_features(tiny_text_bundle, _digit_pngs(tmp_path / "more", 5), batch_size=2, progress_every_s=3600)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("image features: ")]
    assert [line.split(" images")[0] for line in lines] == ["image features: 5/5"]  # only the last, when slow


def test_readable_image_features_skip_broken_files(tiny_text_bundle, tmp_path):
    paths = _digit_pngs(tmp_path / "img", 4)
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
