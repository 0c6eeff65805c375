"""Hostile devices against the aggregator: every message a device can send (retained statuses, metrics,
updates on its own topic or on a topic whose id is outside the grammar) is refused with a reason or
ignored, acknowledged once its outcome is durable, and never crashes the process or loops it on a restart;
what the aggregator writes stays strict JSON and bounded; a kill inside a commit leaves no orphans."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from flora.broker.checkpoint import Checkpoint
from flora.broker.ratelimit import Rate
from flora.broker.rounds import Sampling
from flora.edge import adapter
from flora.edge.protocol import ProtocolError, RoundAnnouncement
from flora.edge.synthetic import encode_update, random_adapter, synthetic_manifest

from .fakes import FakeClock, FakeMqttClient, metrics, offline_aggregator, status
from .helpers import ADVERSARIAL, adversarial_headers, nested

M = synthetic_manifest()


def strict_loads(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers (JavaScript, Go, jq) do."""
    def refuse(name: str):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def publish(agg, fake, topic_tail: str, payload: bytes, mid: int) -> None:
    """What paho's network thread does with an incoming QoS 1 PUBLISH on flora/<fed>/<topic_tail>."""
    agg._on_message(fake, None, SimpleNamespace(topic=f"{agg.topics.base}/{topic_tail}", payload=payload, mid=mid,
                                                qos=1))


@pytest.fixture
def agg(tmp_path):
    a = offline_aggregator(tmp_path / "state", FakeClock(), client=FakeMqttClient(), rounds=2,
                           sampling=Sampling(min_clients=1), update_rate=Rate.parse("off"))  # every one parsed
    a._resume_or_start()
    a.connections = 1
    return a


def hostile_updates():
    return [*adversarial_headers(), *ADVERSARIAL[:12]]


def test_hostile_messages_are_counted_acked_and_never_crash_it_in_a_round_or_out_of_one(agg):
    fake, mid = agg.client, 0
    bad_ids = ["x" * 65, "c1\n", "a+b", "é", ""]
    sent_updates = 0
    for opened in (False, True):
        for payload in ADVERSARIAL:
            for tail in ("status/a", "metrics/a", "status/" + "y" * 65):
                mid += 1
                publish(agg, fake, tail, payload, mid)
        agg._drain(0)  # raises on today's code: RecursionError, OverflowError
        updates = [("update/a", blob) for blob in hostile_updates()] + [
            (f"update/{bad}", encode_update(M, random_adapter(M, 1), "a", 0, 5)) for bad in bad_ids]
        for tail, blob in updates:
            mid += 1
            sent_updates += 1
            publish(agg, fake, tail, blob, mid)
            agg._drain(0)  # paho's thread would wait for room after max_queued_updates
        if not opened:
            assert agg.current is None and agg.online == set()  # no hostile status made anyone online
            no_round = agg.checkpoint.load_no_round(0)
            assert no_round["count"] == len(hostile_updates()) and no_round["counts"] == {"bad-client-id": 5}
            agg.handle("status", "a", status("a"))
            agg._open_round()
    assert sorted(fake.acked()) == list(range(1, mid + 1))  # every message acknowledged, each once
    rec = agg.current
    counts = rec.rejection_counts
    assert counts["no-round"] == len(hostile_updates()) and counts["bad-client-id"] == 2 * len(bad_ids)
    assert sum(counts.values()) == sent_updates  # nothing dropped uncounted
    assert rec.reported == {} and agg.checkpoint.load_open_round(0, replay=True)["rejection_counts"] == counts
    good = random_adapter(M, 2)
    agg.handle("update", "a", encode_update(M, good, "a", 0, 7))  # the device's honest update still counts
    agg.handle("metrics", "a", metrics("a", 0, 0.5))
    agg._close_round()
    new = adapter.decode(agg.global_blob, M.trainable)
    np.testing.assert_array_equal(new.tensors[M.trainable[0].name], good[M.trainable[0].name])


def test_a_restart_does_not_meet_the_hostile_retained_status_again_as_a_crash(agg):
    """A retained status is redelivered to every new session: it must be as harmless the second time."""
    for _attempt in range(2):
        agg._handle_event("status", "a", nested(1000).encode(), None)
        agg._handle_event("status", "a", b'{"client_id": "a", "state": "online", "round": 1e400}', None)
        agg._handle_event("status", "a", b'{"client_id": "a", "state": "online", "num_samples": Infinity}', None)
    assert agg.online == set()


def test_metrics_are_kept_as_the_schemas_fields_and_history_is_strict_json(tmp_path):
    def nan_hook(rnd, tensors):
        return {"test_accuracy": float("nan"), "test_loss": np.float32("inf"), "per_class": np.array([0.5, 0.25])}

    agg = offline_aggregator(tmp_path / "state", FakeClock(), rounds=1, sampling=Sampling(min_clients=1),
                             on_round_closed=nan_hook)
    agg._resume_or_start()
    agg.handle("status", "a", status("a"))
    agg._open_round()
    agg.handle("update", "a", encode_update(M, random_adapter(M, 1), "a", 0, 5))
    good = json.loads(metrics("a", 0, 0.5))
    agg.handle("metrics", "a", json.dumps({**good, "backend": "x" * 20_000_000}).encode())  # refused: too big
    agg.handle("metrics", "a", json.dumps({**good, "junk": "x" * 1000}).encode())  # refused: unknown key
    assert agg.current.metrics == {}
    agg.handle("metrics", "a", json.dumps(good).encode())
    assert agg.current.metrics["a"]["accuracy"] == 0.5
    agg._close_round()
    for name in ("state.json", "history.jsonl"):
        text = (agg.checkpoint.dir / name).read_text()
        assert len(text) < 20_000, name  # the 20 MB string went nowhere
        for line in (text.splitlines() if name.endswith("l") else [text]):
            strict_loads(line)
    row = agg.checkpoint.history()[-1]
    assert row["test_accuracy"] is None and row["test_loss"] is None and row["per_class"] == [0.5, 0.25]
    assert set(row["metrics"]["a"]) == {"loss", "accuracy", "train_accuracy", "samples", "steps", "epochs",
                                        "wall_time_s", "step_time_s", "peak_rss_mb", "backend"}


def test_load_sweeps_the_globals_and_temporary_files_a_kill_inside_a_commit_leaves(tmp_path):
    cp = Checkpoint(tmp_path)
    blob0 = adapter.encode(random_adapter(M, 0), model_id=M.model_id, round=0, kind="global")
    state = cp.start(M.model_id, 3, blob0)
    blob1 = adapter.encode(random_adapter(M, 1), model_id=M.model_id, round=1, kind="global")
    state = cp.commit(state, 1, blob1, {"round": 0}, False)
    # a kill after the previous global was written but before it was deleted, and one after the next global
    # was written but before state.json switched to it; plus torn temporary files of atomic writes
    (tmp_path / "global-000000.safetensors").write_bytes(blob0)
    (tmp_path / "global-000002.safetensors").write_bytes(blob1)
    (tmp_path / ".state.json.abc123.tmp").write_text("{")
    spool = cp.spool_dir(1)
    spool.mkdir(parents=True)
    (spool / ".c1.safetensors.x9.tmp").write_bytes(b"part")
    loaded, blob = cp.load()
    assert blob == blob1 and loaded.round == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "global-000001.safetensors", "history.jsonl", "state.json"]
    assert list(spool.iterdir()) == []
    # the globals an async window keeps are named in state.extra and survive the sweep
    loaded.extra["async"] = {"window": [{"round": 0, "file": "global-000000.safetensors"}]}
    cp.save(loaded)
    (tmp_path / "global-000000.safetensors").write_bytes(blob0)
    (tmp_path / "global-000002.safetensors").write_bytes(blob1)
    cp.load()
    assert sorted(p.name for p in tmp_path.glob("global-*")) == ["global-000000.safetensors",
                                                                "global-000001.safetensors"]


def test_the_aggregator_refuses_a_bundle_whose_adapter_does_not_match_its_manifest(tmp_path, capsys):
    from flora.broker.cli import main
    from flora.edge.synthetic import write_bundle

    bundle = write_bundle(tmp_path / "bundle", M)
    path = bundle / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one flipped bit in a tensor: still a valid, finite adapter
    path.write_bytes(bytes(data))
    adapter.decode(bytes(data), M.trainable, model_id=M.model_id)  # what today's aggregator would publish
    code = main(["--bundle", str(bundle), "--broker", "mqtt://127.0.0.1:1", "--state-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "adapter.safetensors does not match its manifest sha256" in err, err
    assert not (tmp_path / "s" / "state.json").exists()  # nothing was started from it


def test_flora_agent_refuses_a_client_id_with_a_trailing_newline(tmp_path, capsys):
    from flora.edge.cli import main

    code = main(["run", "--bundle", str(tmp_path / "b"), "--data", str(tmp_path / "d"), "--broker",
                 "mqtt://127.0.0.1:1", "--client-id", "c1\n"])
    assert code == 2 and "invalid client id" in capsys.readouterr().err


def test_topics_with_ids_outside_the_grammar_are_told_apart():
    from flora.edge.protocol import Topics

    t = Topics("fed")
    assert t.client_of("flora/fed/update/c1", "update") == "c1"
    assert t.client_of("flora/fed/update/c1\n", "update") is None and t.split("flora/fed/update/c1\n") == (
        "update", "c1\n")
    assert t.split("flora/other/update/c1") is None and t.split("flora/fed/round") is None


# -- the running aggregator, over a real broker ------------------------------------------------------------
def saved_count(state) -> int:
    """Updates counted in the no-round record of round 0 on disk."""
    path = state / "spool" / "round-000000" / "no-round.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    return saved.get("count", 0) + sum(saved.get("counts", {}).values())


@pytest.mark.mqtt
def test_the_running_aggregator_stays_up_under_a_fuzzed_device_and_counts_every_hostile_update(mosquitto, tmp_path):
    """The CLI, two honest scripted devices and one hostile device that sends a seeded corpus of adversarial
    and random statuses (retained), metrics and updates (on its own topic and on ids outside the grammar):
    the process stays up, every hostile update is counted in a history row, the federation finishes with
    the honest updates alone."""
    import random
    import signal
    import time

    from bench.bench_hostile import _Devices, _history, _start_aggregator, json_corpus, update_corpus
    from flora.edge.protocol import Metrics, Status
    from flora.edge.synthetic import write_bundle

    m = synthetic_manifest(blocks=2, width=16, rank=4)
    rng = random.Random(5)
    statuses = json_corpus(json.loads(Status("evil", "online").to_json()), 150, rng)
    metric_msgs = json_corpus(json.loads(Metrics("evil", 0, 0.5, 0.5, None, 10, 2, 1, 1.0, 0.1, 100.0,
                                                 "step").to_json()), 150, rng)
    updates = update_corpus(encode_update(m, random_adapter(m, 3), "evil", 0, 10), 120, rng)
    # the aggregator advertises MQTT 5 Maximum Packet Size: the broker never hands it a larger update (it
    # discards it), so only the others reach it, and every one of those is counted
    from flora.broker.aggregator import PACKET_OVERHEAD
    from flora.edge import adapter as adapter_mod

    limit = adapter_mod.max_blob_bytes(m.trainable) + PACKET_OVERHEAD
    oversized = [len(b) + 200 > limit for b in updates]
    assert any(oversized) and all(len(b) + 200 > limit + 1000 for b, big in zip(updates, oversized) if big)
    bundle, state = write_bundle(tmp_path / "bundle", m), tmp_path / "state"
    devices = _Devices(mosquitto.url, m, ["h1", "h2"])
    proc = _start_aggregator(bundle, mosquitto.url, state, tmp_path / "aggregator.log", rounds=2,
                             extra=["--rate-limit", "off"])  # every hostile update is parsed
    try:
        assert devices.global_seen.wait(30), "the aggregator never published its global"
        t = devices.topics
        for payload in statuses:
            devices.pub(t.status("evil"), payload, retain=True)
        devices.pub(t.status("evil"), b"", retain=True)  # some of the corpus is valid: evil must not be asked
        for payload in metric_msgs:
            devices.pub(t.metrics("evil"), payload)
        bad_topics = [f"{t.base}/update/{'x' * 65}", f"{t.base}/update/a b", f"{t.base}/update/\u00e9"]
        for i, blob in enumerate(updates):
            devices.pub(t.update("evil") if i % 10 else bad_topics[i // 10 % 3], blob)
        deadline = time.monotonic() + 60
        counted = 0
        reaching = len(updates) - sum(oversized)
        while counted < reaching and time.monotonic() < deadline and proc.poll() is None:
            counted = saved_count(state)
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "aggregator.log").read_text()[-3000:]
        time.sleep(1.0)
        counted = saved_count(state)
        assert counted == reaching  # every hostile update it received counted while no round was open
        devices.online()
        devices.play(time.monotonic() + 60)
        assert devices.done.is_set() and proc.wait(30) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        devices.stop()
    rows = _history(state)
    assert [sorted(r["reported"]) for r in rows] == [["h1", "h2"], ["h1", "h2"]]
    counts = rows[0]["rejection_counts"]
    assert sum(counts.values()) == reaching and set(counts) == {"no-round", "bad-client-id"}
    assert counts["bad-client-id"] == sum(1 for i in range(0, len(updates), 10) if not oversized[i])


# -- the agent ----------------------------------------------------------------------------------------------
def test_the_agent_stays_up_under_thousands_of_hostile_round_and_global_messages_then_trains(tmp_path):
    """A seeded corpus of adversarial and random `round` and `global` payloads (deep nesting, 1e400, NaN,
    huge integers, forged headers, wrong types) while a valid round is announced: the agent ignores every one,
    keeps the valid round and global, and trains and submits it."""
    import random

    from bench.bench_hostile import json_corpus, update_corpus

    from .fakes import offer_round, offline_agent, updates

    agent = offline_agent(tmp_path / "state")
    m = agent.manifest
    rng = random.Random(7)
    good_global = offer_round(agent, 0, tensors=random_adapter(m, 4))  # queues the genuine global and round
    good_round = json.loads(agent.events.queue[-1][1])
    hostile = [("round", p) for p in json_corpus(good_round, 1200, rng)] + [
        ("round", p) for p in ADVERSARIAL] + [
        ("global", b) for b in update_corpus(good_global, 800, rng)] + [("global", b) for b in adversarial_headers()]
    rng.shuffle(hostile)
    for kind, payload in hostile:  # after the genuine pair: none of them may displace it
        if kind == "round" and payload != json.dumps(good_round).encode():
            try:  # a mutation can be valid (an optional key dropped): that is not hostile, leave it out
                RoundAnnouncement.from_json(payload)
                continue
            except ProtocolError:
                pass
        if kind == "global":
            try:
                adapter.decode(payload, m.trainable, model_id=m.model_id)
                continue
            except adapter.AdapterError:
                pass
        agent.events.put((kind, payload))
    assert agent.pump() is True  # raises on today's code (RecursionError, OverflowError)
    assert agent.round is not None and agent.round.round == 0
    got = updates(agent)
    assert len(got) == 1 and got[0].meta.round == 0 and got[0].meta.kind == "update"
