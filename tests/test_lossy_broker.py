"""Lossy brokers: an update the broker dropped is asked for again and re-sent from the device's outbox, a lost or
stale retained global is published again (on a reconnect, on every extension, when a device says it waits for
it), and a forged far-future round number is refused. Offline (fakes) first, then the real broker restarted
without persistence under a running federation."""

from __future__ import annotations

import json

from flora.broker import aggregator as agg_mod
from flora.broker.rounds import Sampling
from flora.edge import agent_rules as rules
from flora.edge.fileio import sha256_bytes
from flora.edge.protocol import RoundAnnouncement, Status, TrainConfig
from flora.edge.synthetic import encode_update, random_adapter

from .fakes import FakeClock, offer_round, offline_agent, offline_aggregator, status, updates


def status_of(client: str, **fields) -> bytes:
    return Status(client, "idle", **fields).to_json()


def open_round(tmp_path, clock, clients=("a", "b"), **kw):
    agg = offline_aggregator(tmp_path / "state", clock, rounds=2, sampling=Sampling(min_clients=len(clients)), **kw)
    agg._resume_or_start()
    for c in clients:
        agg.handle("status", c, status(c))
    agg._open_round()
    return agg


def test_an_update_a_status_says_was_submitted_but_never_came_is_asked_for_again(tmp_path):
    clock = FakeClock()
    agg = open_round(tmp_path, clock)
    m = agg.manifest
    agg.handle("update", "a", encode_update(m, random_adapter(m, 1), "a", 0, 5))
    agg.handle("status", "a", status_of("a", round=0, submitted=0))  # a's update came: nothing missing
    agg.handle("status", "b", status_of("b", round=0, submitted=0))  # b's was dropped on the way
    agg._tick()
    assert agg.client.announcements()[-1].resend == {}  # not yet: it may still be in flight
    clock.t += agg_mod.RESEND_AFTER_S
    agg._tick()
    asked = agg.client.announcements()[-1]
    assert asked.resend == {"b": 1} and asked.round == 0 and agg.checkpoint.load_open_round(0)["resend"] == {"b": 1}
    for attempt in (2, 3):
        clock.t += agg_mod.RESEND_AFTER_S
        agg._tick()
        assert agg.client.announcements()[-1].resend == {"b": attempt}
    clock.t += agg_mod.RESEND_AFTER_S
    count = len(agg.client.announcements())
    agg._tick()
    assert len(agg.client.announcements()) == count  # at most RESEND_ATTEMPTS requests a round
    agg.handle("update", "b", encode_update(m, random_adapter(m, 2), "b", 0, 5))  # the re-sent copy
    assert agg.current.missing_since == {}
    agg._tick()
    clock.t += 2  # the metrics grace
    agg._tick()
    assert agg.state.round == 1 and agg.checkpoint.history()[-1]["reported"] == {"a": 5, "b": 5}


def test_the_agent_re_sends_its_stored_update_once_per_request(tmp_path):
    agent = offline_agent(tmp_path / "state")
    offer_round(agent, 0)
    agent.pump()
    (sent,) = agent.client.of("update")
    assert agent.client.statuses()[-1].submitted == 0  # the status says so
    for attempt in (1, 1, 2):  # the same request twice (a re-delivered retained round), then a second one
        offer_round(agent, 0, resend={"dev-1": attempt})
        agent.pump()
    assert agent.client.of("update") == [sent] * 3  # the very bytes, once per request
    offer_round(agent, 0, resend={"someone-else": 5})
    agent.pump()
    assert len(agent.client.of("update")) == 3


def test_rules_resend_only_what_is_stored_and_refuse_far_future_rounds():
    view = rules.AgentView("dev-1", "m", run_id="r", last_submitted_round=3, outbox_round=3)
    r3 = RoundAnnouncement(round=3, model_id="m", state="training", config=TrainConfig(), clients="all",
                           deadline=1.0, global_sha256="0" * 64, total_rounds=9, run_id="r", resend={"dev-1": 2})
    assert rules.enter_round(r3, view) == (rules.Resend(3, 2),)
    assert rules.enter_round(r3, rules.AgentView("dev-1", "m", run_id="r", outbox_round=2)) == ()  # not stored
    assert rules.enter_round(r3, rules.AgentView("dev-1", "m", run_id="r", outbox_round=3,
                                                 resent=frozenset({("r", 3, 2)}))) == ()  # served already
    far = RoundAnnouncement(**{**r3.__dict__, "round": 3 + 1001, "resend": {}})
    assert rules.check_round_jump(far, rules.AgentView("dev-1", "m", run_id="r", highest_round=3), 1000) is not None
    near = RoundAnnouncement(**{**r3.__dict__, "round": 3 + 1000, "resend": {}})
    assert rules.check_round_jump(near, rules.AgentView("dev-1", "m", run_id="r", highest_round=3), 1000) is None
    assert rules.check_round_jump(far, rules.AgentView("dev-1", "m", run_id="r"), 1000) is None  # nothing seen yet
    assert rules.check_round_jump(far, rules.AgentView("dev-1", "m", run_id="q", highest_round=3), 1000) is None
    assert rules.check_round_jump(far, rules.AgentView("dev-1", "m", run_id="r", highest_round=3), 0) is None


def test_a_forged_far_future_round_does_not_silence_the_agent(tmp_path):
    agent = offline_agent(tmp_path / "state")
    offer_round(agent, 0)
    agent.pump()
    offer_round(agent, 10 ** 8)  # a forger on an open broker, with a matching forged global
    agent.pump()
    assert agent.state.last_submitted_round == 0 and len(updates(agent)) == 1
    offer_round(agent, 1)  # the real next round still trains
    agent.pump()
    assert agent.state.last_submitted_round == 1 and [u.meta.round for u in updates(agent)] == [0, 1]


def test_the_agent_says_which_global_it_waits_for_and_the_aggregator_publishes_it_again(tmp_path):
    agent = offline_agent(tmp_path / "state")
    blob = offer_round(agent, 0)
    agent.events.queue.popleft()  # the broker lost the retained global: only the round arrives
    agent.pump()
    waiting = agent.client.statuses()[-1]
    assert waiting.wants_global == sha256_bytes(blob) and updates(agent) == []
    agent.pump()
    assert agent.client.statuses()[-1] == waiting  # asked once, not on every pump

    clock = FakeClock()
    agg = open_round(tmp_path / "agg", clock)
    before = len(agg.client.of("global"))
    agg.handle("status", "a", status_of("a", wants_global="f" * 64))  # another global: not ours to send
    agg._maybe_republish()
    assert len(agg.client.of("global")) == before
    agg.handle("status", "a", status_of("a", wants_global=sha256_bytes(agg.global_blob)))
    agg.handle("status", "b", status_of("b", wants_global=sha256_bytes(agg.global_blob)))
    agg._maybe_republish()
    agg._maybe_republish()
    assert agg.client.of("global")[before:] == [agg.global_blob]  # once for both: rate-limited
    assert agg.client.announcements()[-1].round == 0
    agg.handle(agg_mod.RECONNECTED, "", b"")  # a reconnect goes at once
    agg._maybe_republish()
    assert agg.client.of("global")[before:] == [agg.global_blob] * 2


def test_every_extension_publishes_the_global_before_the_round(tmp_path):
    clock = FakeClock()
    agg = open_round(tmp_path, clock, round_timeout_s=10)
    kinds = [p.kind for p in agg.client.published]
    clock.t += 11
    agg._tick()
    assert [p.kind for p in agg.client.published][len(kinds):] == ["global", "round"]
    assert json.loads(agg.client.of("round")[-1])["deadline"] == clock.t + 10


# -- the real broker, restarted without persistence ------------------------------------------------------------
def live_agent(state_dir, url: str, client_id: str, manifest, federation: str):
    """A real Agent over a real paho client with the numpy FakeTrainer and random features (no bundle)."""
    import time as _time

    from flora.edge.agent import Agent, AgentConfig, open_state
    from flora.edge.bundle import Bundle
    from flora.edge.local_data import DeviceData
    from flora.edge.mqtt import BrokerConfig, make_client
    from flora.edge.protocol import Topics
    from flora.edge.state import StateStore

    from .fakes import FakeTrainer, feature_data

    bundle = Bundle(state_dir.parent / "no-bundle", manifest)
    cfg = AgentConfig(bundle=bundle.root, data=state_dir.parent / "no-data", broker=BrokerConfig.from_url(url),
                      client_id=client_id, federation=federation, state_dir=state_dir, progress_every_s=0.0,
                      publish_timeout_s=5.0)
    store = StateStore(state_dir)
    state = open_state(store, client_id, manifest.model_id, federation)
    will = Status(client_id, "offline", ts=_time.time())
    client = make_client(cfg.broker, client_id, will_topic=Topics(federation).status(client_id),
                         will_payload=will.to_json())
    return Agent(cfg, bundle=bundle, trainer=FakeTrainer(bundle),
                 data=DeviceData(feature_data(manifest, 12, 0), feature_data(manifest, 4, 1)), store=store,
                 state=state, client=client)


def test_a_broker_restarted_without_persistence_and_a_restarted_agent_do_not_stall_the_federation(
        mosquitto_binary, tmp_path, monkeypatch):
    import subprocess
    import sys
    import threading
    import time

    from flora.broker.mosquitto import start_mosquitto
    from flora.edge.synthetic import synthetic_manifest, write_bundle

    m = synthetic_manifest()
    fed = "lossy"
    broker = start_mosquitto(tmp_path / "mosquitto")
    port = broker.port
    for name, value in broker.env.items():  # the restarted broker gets the same credentials
        monkeypatch.setenv(name, value)
    bundle, state = write_bundle(tmp_path / "bundle", m), tmp_path / "agg-state"
    log = tmp_path / "aggregator.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flora.broker.cli", "--bundle", str(bundle), "--broker",
                                 broker.url, "--federation", fed, "--rounds", "3", "--state-dir", str(state),
                                 "--min-clients", "2", "--round-timeout", "4", "--metrics-grace", "0"],
                                stdout=out, stderr=subprocess.STDOUT)
    agents, threads = {}, {}

    def start(client_id: str) -> None:
        agents[client_id] = live_agent(tmp_path / client_id, broker.url, client_id, m, fed)
        threads[client_id] = threading.Thread(target=agents[client_id].run, daemon=True)
        threads[client_id].start()

    def rounds_done() -> int:
        path = state / "history.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def wait(what, timeout: float, describe: str) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"timed out: {describe}\n" + log.read_text()[-3000:]
            time.sleep(0.1)

    try:
        for c in ("d1", "d2"):
            start(c)
        wait(lambda: rounds_done() >= 1, 60, "round 0")
        broker.stop()  # every retained message and the aggregator's session are gone
        broker = start_mosquitto(tmp_path / "mosquitto2", port=port, listener_config=[  # the same password
            "allow_anonymous false", f"password_file {tmp_path / 'mosquitto' / 'passwords'}"])
        agents["d2"].stop()  # and a device restarts (a fresh process, the same state dir)
        threads["d2"].join(30)
        start("d2")
        wait(lambda: proc.poll() is not None, 120, "the federation to finish")
        assert proc.returncode == 0, log.read_text()[-3000:]
    finally:
        for a in agents.values():
            a.stop()
        if proc.poll() is None:
            proc.kill()
        broker.stop()
    rows = [json.loads(ln) for ln in (state / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2], log.read_text()[-3000:]
    assert all(sorted(r["reported"]) == ["d1", "d2"] for r in rows), [r["reported"] for r in rows]
    assert "publishing the round-" in log.read_text()  # it did publish again after the restart
