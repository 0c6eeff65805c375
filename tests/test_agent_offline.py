"""The agent's behaviour, driven without a bundle or a broker: a synthetic manifest, a numpy FakeTrainer and a
FakeMqttClient (tests/fakes.py) around the real Agent and its rules. Neither torch nor onnxruntime is imported
(the last test proves it for this module and test_agent_rules.py); test_agent_wiring.py and test_agent_mqtt.py
run the same agent on an exported bundle and a real mosquitto."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Dict, List, Tuple

from flora.edge import adapter, fileio
from flora.edge.fileio import sha256_bytes
from flora.edge.state import AgentState, StateStore
from flora.edge.synthetic import random_adapter
from flora.edge.trainers import TrainerError

from .fakes import FakeMqttClient, offer_round, offline_agent, updates
from .helpers import run_pytest_blocking

TESTS = Path(__file__).resolve().parent


def test_an_update_carries_the_training_split_size_and_metrics_count_the_steps(tmp_path):
    agent = offline_agent(tmp_path / "state", train=18, val=6)
    offer_round(agent, 0)
    assert agent.pump() is True
    (update,) = updates(agent)
    assert update.meta.round == 0 and update.meta.num_samples == 18 and update.meta.client_id == "dev-1"
    metrics = json.loads(agent.client.of("metrics")[0])
    assert metrics["samples"] == 18 and metrics["steps"] == 5 and metrics["backend"] == "fake"  # ceil(18 / 4)
    assert agent.trainer.steps == [4, 4, 4, 4, 2] and agent.trainer.evaluated == [6]
    assert StateStore(tmp_path / "state").load().outbox_sent is True
    assert [s.state for s in agent.client.statuses()] == ["training", "idle"]
    assert max(abs(float(v.max())) for v in update.tensors.values()) > 0  # it trained: 5 steps of -lr


def test_a_failing_round_is_reported_once_and_the_next_round_trains(tmp_path, caplog):
    agent = offline_agent(tmp_path / "state")
    fake = agent.client
    agent.trainer.fail_with = TrainerError("training step 1 produced a non-finite loss (nan)")
    trained = []
    real_train = agent.train
    agent.train = lambda r: (trained.append(r.round), real_train(r))
    blob = offer_round(agent, 0)
    with caplog.at_level(logging.INFO, logger="flora.agent"):
        assert agent.pump() is True  # the agent keeps running
        error = fake.statuses()[-1]
        assert error.state == "error" and "non-finite loss" in error.last_error and error.round == 0
        assert error.error_code == "round-failed"  # the aggregator does not wait for it this round
        assert fake.of("update") == [] and trained == [0]
        state = StateStore(tmp_path / "state").load()
        assert state.last_submitted_round is None
        assert (state.global_round, state.global_sha256) == (0, sha256_bytes(blob))  # saved when applied
        offer_round(agent, 0)  # the retained round again (a reconnect): not retried in this process
        agent.pump()
        agent.pump()
        assert trained == [0] and fake.of("update") == []
        assert caplog.text.count("round 0 failed in this process: not retrying it") == 1
    assert agent.trainer.resets == 1  # a fresh optimizer: a NaN step may have poisoned AdamW's moments
    agent.trainer.fail_with = None
    offer_round(agent, 1)
    agent.pump()
    assert trained == [0, 1] and [u.meta.round for u in updates(agent)] == [1]
    assert fake.statuses()[-1].state == "idle"


def test_an_update_in_flight_is_never_published_twice(tmp_path):
    fake = FakeMqttClient(hold={"update"})  # the broker's ack does not come within publish_timeout_s
    agent = offline_agent(tmp_path / "state", client=fake)
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
    fake.acknowledge(fake.mid_of("update"))  # paho reports it published after the reconnect
    agent.pump()
    assert store.load().outbox_sent is True and len(fake.of("update")) == 1


def _stored_update(tmp_path: Path, round_: int = 0, run_id: str = "run-a") -> bytes:
    """The state dir of an agent that crashed after storing round `round_`'s update, before the broker's ack."""
    m = offline_agent(tmp_path / "probe").manifest
    blob = adapter.encode(random_adapter(m, 7), model_id=m.model_id, round=round_, kind="update", client_id="dev-1",
                          num_samples=7)
    state = AgentState(client_id="dev-1", model_id=m.model_id, federation="fed", run_id=run_id)
    StateStore(tmp_path / "state").stash_update(state, round_, blob)
    return blob


def test_restarted_agent_resends_the_stored_update_once_and_does_not_train(tmp_path):
    stored = _stored_update(tmp_path)
    agent = offline_agent(tmp_path / "state")
    for _ in range(2):
        agent.events.put(("connected", b""))
        offer_round(agent, 0)
        agent.pump()
    assert agent.client.of("update") == [stored] and agent.trainer.steps == []
    assert StateStore(tmp_path / "state").load().outbox_sent is True


def test_a_restarted_agent_whose_outbox_file_is_gone_says_so_and_sends_nothing(tmp_path, caplog):
    _stored_update(tmp_path)
    (tmp_path / "state" / "outbox.safetensors").unlink()
    agent = offline_agent(tmp_path / "state")
    with caplog.at_level(logging.INFO, logger="flora.agent"):
        offer_round(agent, 0)
        agent.pump()
    assert agent.client.of("update") == [] and agent.trainer.steps == []
    assert "the update of round 0 is recorded but its file is missing: not re-sent" in caplog.text


def test_the_record_of_submitted_rounds_holds_for_one_run_and_federation(tmp_path, caplog):
    store = StateStore(tmp_path / "state")
    m = offline_agent(tmp_path / "probe").manifest
    state = AgentState(client_id="dev-1", model_id=m.model_id, federation="fed", run_id="run-a")
    store.stash_update(state, 3, b"old-update")
    store.mark_sent(state)
    agent = offline_agent(tmp_path / "state")
    offer_round(agent, 2, run_id="run-a")  # the same run: already submitted
    agent.pump()
    assert agent.client.of("update") == []
    offer_round(agent, 2, run_id="")  # an older aggregator without run ids: today's rule
    agent.pump()
    assert agent.client.of("update") == []
    with caplog.at_level(logging.INFO, logger="flora.agent"):
        offer_round(agent, 0, run_id="run-b")  # a federation started afresh: round 0 again
        agent.pump()
    assert [u.meta.round for u in updates(agent)] == [0]
    assert "federation run run-b (the record was for run run-a): forgetting that rounds up to 3" in caplog.text
    after = store.load()
    assert after.run_id == "run-b" and after.last_submitted_round == 0

    # another federation with the same state dir starts a fresh record too
    other = offline_agent(tmp_path / "state", federation="other-fed")
    assert store.load().last_submitted_round is None and store.load().federation == "other-fed"
    offer_round(other, 0, run_id="")
    other.pump()
    assert [u.meta.round for u in updates(other)] == [0]


def test_round_messages_of_a_newer_protocol_are_refused_once(tmp_path, caplog):
    agent = offline_agent(tmp_path / "state")
    fake = agent.client
    with caplog.at_level(logging.INFO, logger="flora.agent"):
        offer_round(agent, 0, protocol=2)
        agent.pump()
        offer_round(agent, 0, protocol=2)
        assert agent.pump() is True
    assert caplog.text.count("refused a round message of protocol 2, newer than this agent's 1") == 1
    assert fake.of("update") == [] and agent.round is None
    assert [(s.state, s.error_code) for s in fake.statuses()] == [("error", "protocol-mismatch")]
    offer_round(agent, 0, protocol=1)
    agent.pump()
    assert [u.meta.round for u in updates(agent)] == [0]


def test_a_refused_global_is_an_error_status_and_the_round_waits_for_its_own(tmp_path, caplog):
    agent = offline_agent(tmp_path / "state")
    m = agent.manifest
    with caplog.at_level(logging.INFO, logger="flora.agent"):
        agent.events.put(("global", adapter.encode(random_adapter(m, 1), model_id="f" * 64, round=0, kind="global")))
        agent.pump()
    assert agent.client.statuses()[-1].state == "error" and "model_id ffff" in agent.client.statuses()[-1].last_error
    assert agent.client.statuses()[-1].error_code == "model-mismatch"
    blob = offer_round(agent, 0)
    agent.events.put(("global", b"garbage"))  # arrives after the round's own: refused, the good one stays
    agent.pump()
    assert [u.meta.round for u in updates(agent)] == [0] and agent.global_.blob == blob
    assert "refused the global adapter: " in caplog.text


def test_a_round_for_another_model_is_one_model_mismatch_error_status(tmp_path):
    agent = offline_agent(tmp_path / "state")
    for _ in range(3):  # the retained round, again and again (reconnects)
        offer_round(agent, 4, model_id="e" * 64)
        agent.pump()
    errors = [s for s in agent.client.statuses() if s.state == "error"]
    assert len(errors) == 1 and errors[0].error_code == "model-mismatch" and errors[0].round == 4
    assert errors[0].last_error.startswith("round 4 is for model eeeeeeeeeeeeeeee, this bundle is ")
    assert agent.client.of("update") == []


def test_done_is_idle_once_and_exits_with_exit_when_done(tmp_path, caplog):
    agent = offline_agent(tmp_path / "state", exit_when_done=True)
    with caplog.at_level(logging.INFO, logger="flora.agent"):
        offer_round(agent, 4, state="done", clients=[])
        assert agent.pump() is False
        offer_round(agent, 4, state="done", clients=[])
        assert agent.pump() is False
    assert caplog.text.count("the federation is done after 5 rounds") == 1
    assert [s.state for s in agent.client.statuses()] == ["idle"] and agent.trainer.steps == []
    stays = offline_agent(tmp_path / "other")
    offer_round(stays, 4, state="done", clients=[])
    assert stays.pump() is True and stays.done


# -- every short history: a round is trained at most once per run, and every copy of it is the same bytes --

#: What can happen to a device between two looks at its queue: a round message (with its global) of a
#: run, the broker acknowledging the update in flight, a crash and restart on the same state dir.
EVENTS = [("round", "run-a", 0), ("round", "run-a", 1), ("round", "", 1), ("round", "run-b", 0), ("ack",),
          ("restart",)]


def _play(tmp_path: Path, history) -> Tuple[Dict[Tuple[str, int], int], Dict[Tuple[str, int], List[bytes]]]:
    """Run `history` on one state dir with acks held: per (the record's run, round), how often it was trained
    and the update payloads published."""
    def start():
        return offline_agent(tmp_path / "state", client=FakeMqttClient(hold={"update"}), publish_timeout_s=0.0)

    agent, trained, sent = start(), {}, {}
    for event in history:
        if event[0] == "round":
            offer_round(agent, event[2], run_id=event[1])
        elif event[0] == "ack":
            for mid, p in enumerate(agent.client.published, start=1):
                if p.kind == "update":
                    agent.client.acknowledge(mid)
        else:
            agent = start()
        steps, published = len(agent.trainer.steps), len(agent.client.of("update"))
        agent.pump()
        if len(agent.trainer.steps) > steps:
            key = (agent.state.run_id, agent.round.round)
            trained[key] = trained.get(key, 0) + 1
        for blob in agent.client.of("update")[published:]:
            sent.setdefault((agent.state.run_id, adapter.decode(blob).meta.round), []).append(blob)
    return trained, sent


def _runs_in_order(history) -> bool:
    """An aggregator never returns to an earlier run_id: run-a may not follow run-b."""
    runs = [e[1] for e in history if e[0] == "round" and e[1]]
    return "run-b" not in runs or "run-a" not in runs[runs.index("run-b"):]


def test_no_history_of_three_events_trains_a_round_twice_in_one_run(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: None)  # durability is not what this checks: 4x faster
    histories = [h for h in itertools.product(EVENTS, repeat=3) if _runs_in_order(h)]
    assert len(histories) > 150
    trained_somewhere = resent_somewhere = 0
    for i, history in enumerate(histories):
        trained, sent = _play(tmp_path / str(i), history)
        assert all(n == 1 for n in trained.values()), (history, trained)
        assert all(len(set(copies)) == 1 for copies in sent.values()), (history, sent)  # a re-send: the same bytes
        assert set(sent) == set(trained), (history, trained, sent)
        trained_somewhere += bool(trained)
        resent_somewhere += any(len(copies) > 1 for copies in sent.values())
    # the histories do train, and restarts do re-send: the checks above are not vacuous
    assert trained_somewhere > len(histories) // 2 and resent_somewhere > 0


# -- no torch, no onnxruntime ---------------------------------------------------------------------------

HEAVY = ("torch", "torchvision", "open_clip", "onnxruntime")


def test_the_rule_and_offline_agent_tests_import_neither_torch_nor_onnxruntime():
    """Both modules' tests pass in a process where importing torch or onnxruntime raises, and none tried."""
    proc = run_pytest_blocking(HEAVY, str(TESTS / "test_agent_rules.py"), __file__, "-k", "not import_ and not history")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "BLOCKED-TRIED [] LOADED []" in proc.stdout
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def test_the_import_block_can_fail(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text("def test_loads_onnxruntime():\n    import onnxruntime  # noqa: F401\n")
    proc = run_pytest_blocking(HEAVY, str(probe), cwd=tmp_path)
    assert proc.returncode == 99 and "BLOCKED-TRIED ['onnxruntime']" in proc.stdout
