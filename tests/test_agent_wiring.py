"""The agent as `Agent.open` assembles it from an exported clip-tiny bundle, a folder of images and a state dir,
with a FakeMqttClient for the broker: the data path (split, unreadable images, the feature cache, pixels),
the real trainers, and recovery after a failed round. The rules and the agent's behaviour are tested without a
bundle in test_agent_rules.py and test_agent_offline.py; test_agent_mqtt.py runs the agent against mosquitto."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from flora.edge import adapter
from flora.edge.agent import Agent, AgentConfig
from flora.edge.bundle import ADAPTER
from flora.edge.dataset import DatasetError
from flora.edge.features import FeatureCache
from flora.edge.state import StateStore
from flora.edge.trainers import TrainerError

from .fakes import OFFLINE_BROKER, FakeMqttClient, offer_round, updates
from .helpers import class_folders


def open_agent(bundle, data: Path, state_dir: Path, **overrides) -> Agent:
    """`Agent.open` on the bundle and images, with a FakeMqttClient (`agent.client`)."""
    cfg = AgentConfig(bundle=bundle.root, data=data, broker=OFFLINE_BROKER, client_id="dev-1", federation="fed",
                      state_dir=state_dir, val_fraction=0.25, progress_every_s=0.0, publish_timeout_s=0.2)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return Agent.open(cfg, client=FakeMqttClient())


def initial(bundle):
    return adapter.load_file(bundle.path(ADAPTER)).tensors


@pytest.fixture
def digits_folder(tmp_path):
    return class_folders(tmp_path / "data", {"zero": 8, "one": 8, "two": 8})


def test_agent_submits_exactly_its_training_split_size(tiny_text_bundle, digits_folder, tmp_path):
    agent = open_agent(tiny_text_bundle, digits_folder, tmp_path / "state")
    offer_round(agent, 0, tensors=initial(tiny_text_bundle))
    agent.pump()
    (update,) = updates(agent)
    assert update.meta.round == 0 and update.meta.num_samples == 18  # 24 images, 25 % (2 per class) held out
    metrics = json.loads(agent.client.of("metrics")[0])
    assert metrics["samples"] == 18 and metrics["steps"] == 5  # ceil(18 / 4)
    assert metrics["backend"] == "ort-training"
    assert StateStore(tmp_path / "state").load().outbox_sent is True


def test_after_a_failed_round_the_ort_training_optimizer_is_reset_and_the_next_round_trains(
        tiny_text_bundle, digits_folder, tmp_path):
    agent = open_agent(tiny_text_bundle, digits_folder, tmp_path / "state")
    trainer, resets = agent.trainer, []
    real_step, real_reset = trainer.train_step, trainer.reset_optimizer

    def non_finite_once(inputs, labels):
        if not resets:
            raise TrainerError("training step 1 produced a non-finite loss (nan)")
        return real_step(inputs, labels)

    trainer.train_step = non_finite_once
    trainer.reset_optimizer = lambda: (resets.append(True), real_reset())  # ort-training: reopens its sessions
    offer_round(agent, 0, tensors=initial(tiny_text_bundle))
    assert agent.pump() is True
    assert agent.client.statuses()[-1].state == "error" and agent.client.of("update") == []
    assert resets == [True]  # a NaN step may have poisoned AdamW's moments
    offer_round(agent, 1, tensors=initial(tiny_text_bundle))
    agent.pump()
    assert [u.meta.round for u in updates(agent)] == [1] and agent.client.statuses()[-1].state == "idle"


def test_unreadable_images_are_left_out_with_one_warning(tiny_text_bundle, digits_folder, tmp_path, caplog):
    (digits_folder / "one" / "03.png").write_bytes(b"not a png")
    (digits_folder / "two" / "05.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with caplog.at_level(logging.WARNING):
        agent = open_agent(tiny_text_bundle, digits_folder, tmp_path / "state")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("2 of 24 images cannot be read and are left out: ")
    assert "one/03.png" in warnings[0] and "two/05.png" in warnings[0]
    assert len(agent.train_data) + len(agent.val_data) == 22
    assert agent.train_data.features.shape == (len(agent.train_data), tiny_text_bundle.manifest.feature_dim)
    for path in digits_folder.rglob("*.png"):
        path.write_bytes(b"broken")
    with pytest.raises(DatasetError, match=r"none of the training images under .* can be read"):
        open_agent(tiny_text_bundle, digits_folder, tmp_path / "state")


def test_the_feature_cache_drops_other_models_at_startup(tiny_text_bundle, digits_folder, tmp_path, caplog):
    cache = FeatureCache(tmp_path / "state" / "features.sqlite")
    cache.put_many("another-model", {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)})
    cache.close()
    with caplog.at_level(logging.INFO, logger="flora.agent"):
        open_agent(tiny_text_bundle, digits_folder, tmp_path / "state")
    cache = FeatureCache(tmp_path / "state" / "features.sqlite")
    assert cache.count("another-model") == 0 and cache.count(tiny_text_bundle.manifest.model_id) == 24
    cache.close()
    assert "feature cache: dropped 2 entries of other models" in caplog.text


def test_vision_mode_agent_trains_from_pixels(tiny_vision_bundle, digits_folder, tmp_path):
    agent = open_agent(tiny_vision_bundle, digits_folder, tmp_path / "state")
    assert agent.train_data.features is None and len(agent.train_data.paths) == 18
    assert not (tmp_path / "state" / "features.sqlite").exists()
    tensors = initial(tiny_vision_bundle)
    evaluated = []
    real_evaluate = agent.trainer.evaluate_batch
    agent.trainer.evaluate_batch = lambda x, y: evaluated.append(len(x)) or real_evaluate(x, y)
    offer_round(agent, 0, tensors=tensors, epochs=2)
    agent.pump()
    assert evaluated == [4, 2]  # the 6 validation images at the round's batch size, not all at once
    (update,) = updates(agent)
    assert update.meta.num_samples == 18 and update.meta.kind == "update"
    assert any(name.startswith("visual") or "vision" in name for name in update.tensors)
    moved = max(float(np.abs(update.tensors[k] - tensors[k]).max()) for k in tensors)
    assert moved > 1e-4
    assert json.loads(agent.client.of("metrics")[0])["steps"] == 10  # 2 epochs of ceil(18 / 4)


def test_vision_mode_image_broken_during_a_round_is_a_round_error(tiny_vision_bundle, digits_folder, tmp_path):
    agent = open_agent(tiny_vision_bundle, digits_folder, tmp_path / "state")
    Path(agent.train_data.paths[0]).write_bytes(b"garbage")  # after the startup check
    offer_round(agent, 0, tensors=initial(tiny_vision_bundle))
    assert agent.pump() is True
    error = agent.client.statuses()[-1]
    assert error.state == "error" and "cannot be decoded" in error.last_error
    assert agent.client.of("update") == []
