"""Secure aggregation over a real mosquitto: the real aggregator (`secure_aggregation=True`) and enrolled agents
(FakeTrainer, synthetic manifest) in one process, each on its own MQTT connection. A device that drops out
mid-protocol is recovered and the round completes; one dropout more than tolerable aborts the attempt and
the retry (fresh keys) is exact; a restart of the aggregator mid-round aborts and retries, counting nobody
twice; the new global is FedAvg's within the quantization bound; plain updates are refused unread."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest

from flora.broker.enroll import FederationPKI
from flora.broker.secure_round import SecureSettings
from flora.edge import adapter
from flora.edge.protocol import TrainConfig
from flora.edge.secagg.encoding import Encoding

from .fakes import LiveFederation, scripted

pytestmark = pytest.mark.mqtt
ENC = Encoding(clip=0.5, frac_bits=16, max_weight=1000)


def federation(url: str, root: Path, n: int, drops: Optional[Dict[int, Dict[int, str]]] = None, rounds: int = 1,
               **secure) -> LiveFederation:
    """n enrolled devices of different data sizes and steps (so each subset has its own FedAvg); drops[i]: device i's
    scripted dropouts ({attempt: stage})."""
    pki = FederationPKI(root / "aggregator", "fed")
    kws = {i: {**scripted(pki, f"dev-{i}", root / "ids" / f"dev-{i}", (drops or {}).get(i)), "train": 6 + 5 * i}
           for i in range(n)}
    dp = secure.pop("dp", None)
    settings = SecureSettings(encoding=ENC, stage_timeout_s=secure.pop("stage_timeout_s", 5.0), **secure)
    return LiveFederation(url, root, n, aggregator_kw=dict(rounds=rounds, secure_aggregation=True, secagg=settings,
                                                           round_timeout_s=20.0, train=TrainConfig(batch_size=4),
                                                           dp=dp),
                          agent_kw=lambda i: kws[i])


def run(fed: LiveFederation, timeout: float = 90.0):
    fed.start()
    try:
        fed.wait(timeout)
    finally:
        fed.stop()
    return fed.aggregator.checkpoint.history()


def assert_fedavg_of(fed: LiveFederation, row, round_: int = 0) -> None:
    """The round's new global is the survivors' FedAvg (weights = their sample counts) within the bound."""
    survivors = row["secure_aggregation"]["survivors"]
    sessions = {a.cfg.client_id: a.secure for a in fed.agents}
    weights = {c: sessions[c].weights[round_] for c in survivors}
    total = sum(weights.values())
    exact = sum(weights[c] * sessions[c].deltas[round_] for c in survivors) / total
    layout = fed.aggregator.secagg.layout
    start = fed.aggregator.cfg.initial_adapter
    new = fed.aggregator.global_tensors
    got = np.concatenate([np.ravel(new[n]).astype(np.float64) - np.ravel(start[n]) for n, _, _, _ in layout.entries])
    bound = ENC.error_bound(len(survivors), total) + 1e-6  # + float32 rounding of the published global
    assert row["samples"] == total
    assert float(np.max(np.abs(got - exact))) <= bound
    others = [c for c in sessions if c not in survivors and round_ in sessions[c].deltas]
    if others:  # and it is not the FedAvg of everyone: the dropped are really out of the sum
        everyone = sum(sessions[c].weights[round_] * sessions[c].deltas[round_] for c in sessions)
        everyone /= sum(sessions[c].weights[round_] for c in sessions)
        assert float(np.max(np.abs(got - everyone))) > 10 * bound


def trained_chunks(fed: LiveFederation, round_: int = 0, size: int = 32):
    """Stretches (`size` bytes, a few offsets) of each device's trained adapter as a plain float32 update would
    carry it (global + delta, in the manifest's layout), and of its delta as float32 and float64."""
    layout = fed.aggregator.secagg.layout
    start = np.concatenate([np.ravel(fed.aggregator.cfg.initial_adapter[n]).astype(np.float64)
                            for n, _, _, _ in layout.entries])
    for a in fed.agents:
        delta = a.secure.deltas.get(round_)
        if delta is None:
            continue
        for flat in ((start + delta).astype(np.float32), delta.astype(np.float32), delta):
            raw = flat.tobytes()
            for at in (0, len(raw) // 2, len(raw) - size):
                yield a.cfg.client_id, raw[at:at + size]


def files_holding(folder: Path, chunk: bytes):
    return [p for p in folder.rglob("*") if p.is_file() and chunk in p.read_bytes()]


def test_one_device_dropping_out_mid_protocol_is_recovered_and_the_round_completes(mosquitto, tmp_path):
    fed = federation(mosquitto.url, tmp_path, 5, drops={2: {0: "masked-input"}})  # k=4, t=3: tolerates one
    (row,) = run(fed)
    sa = row["secure_aggregation"]
    assert "failed" not in row and [a["status"] for a in sa["attempts"]] == ["done"]
    assert sa["dropped"] == ["dev-2"] and len(sa["survivors"]) == 4 and (sa["shares"], sa["threshold"]) == (4, 3)
    assert row["num_reported"] == 4 and row["reported"] == {c: 0 for c in sa["survivors"]}  # no one's weight shown
    assert_fedavg_of(fed, row)
    assert fed.agents[2].state.last_submitted_round is None  # its update was never given: it may join a retry
    assert all(a.state.last_submitted_round == 0 for i, a in enumerate(fed.agents) if i != 2)
    spool = fed.aggregator.checkpoint.spool_dir(0)
    assert not spool.exists()  # nothing of the round stays on disk once committed


def test_one_dropout_more_than_tolerable_aborts_and_the_retry_with_fresh_keys_is_exact(mosquitto, tmp_path):
    fed = federation(mosquitto.url, tmp_path, 5, drops={1: {0: "masked-input"}, 3: {0: "masked-input"}})
    (row,) = run(fed)
    sa = row["secure_aggregation"]
    assert [(a["attempt"], a["status"]) for a in sa["attempts"]] == [(0, "aborted"), (1, "done")]
    assert "3 client(s) completed masked-input, 4 needed" in sa["attempts"][0]["reason"]
    assert len(sa["survivors"]) == 5  # the two are back for attempt 1: everyone is in the sum, once
    assert_fedavg_of(fed, row)
    assert all(a.state.last_submitted_round == 0 for a in fed.agents)


def test_a_restart_mid_round_aborts_the_attempt_and_the_next_one_counts_everyone_once(mosquitto, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    fed = federation(mosquitto.url, tmp_path, 5, drops={4: {0: "masked-input"}}, stage_timeout_s=30.0)
    fed.start()
    try:  # device 4 keeps stage masked-input of attempt 0 open: stop the aggregator there
        deadline = time.monotonic() + 60
        while True:
            sr = fed.aggregator.secagg.round if fed.aggregator.secagg else None
            if sr is not None and sr.server is not None and len(sr.server.u3) == 4:
                break
            assert time.monotonic() < deadline, "attempt 0 did not reach its masked inputs"
            time.sleep(0.02)
        fed.aggregator.stop()
        fed.threads[0].join(30)
        assert fed.results["aggregator"] == 0 and fed.aggregator.checkpoint.history() == []
        saved = fed.aggregator.checkpoint.load_secure(0)
        assert saved["attempt"] == 0 and saved["running"] and saved["exposed"] == []
        restarted = fed.restart_aggregator(secagg=SecureSettings(encoding=ENC, stage_timeout_s=5.0))
        fed.threads[0].join(60)
        fed.wait(60)
    finally:
        fed.stop()
    (row,) = restarted.checkpoint.history()
    sa = row["secure_aggregation"]
    assert [(a["attempt"], a["status"], a["reason"]) for a in sa["attempts"]] == [
        (0, "aborted", "the aggregator restarted"), (1, "done", "")]
    assert len(sa["survivors"]) == 5  # device 4 answers in attempt 1: all five, each once
    fed.aggregator = restarted
    assert_fedavg_of(fed, row)
    state_dir = tmp_path / "aggregator"  # its state dir and its log: no stretch of any device's update
    chunks = list(trained_chunks(fed))
    assert len(chunks) == 5 * 3 * 3
    assert [(c, files_holding(state_dir, chunk)) for c, chunk in chunks if files_holding(state_dir, chunk)] == []
    assert not any(chunk in caplog.text.encode("latin-1", "replace") for _, chunk in chunks)
    new = adapter.decode(restarted.checkpoint.load_global(1)).as_float32()  # and the scan does find tensors
    first = sorted(new)[0]
    assert files_holding(state_dir, np.ravel(new[first]).astype(np.float32).tobytes()[:32])


def test_a_plain_update_in_a_secure_round_is_refused_unread_and_the_round_completes(mosquitto, tmp_path):
    from flora.edge.mqtt import BrokerConfig, Connection, make_client
    from flora.edge.protocol import Topics

    fed = federation(mosquitto.url, tmp_path, 4)
    cfg = BrokerConfig.from_url(mosquitto.url)
    intruder = make_client(cfg, "intruder")
    conn = Connection(cfg, intruder)
    conn.start(timeout=10)
    m = fed.aggregator.manifest
    blob = adapter.encode(fed.aggregator.cfg.initial_adapter, model_id=m.model_id, round=0, kind="update",
                          client_id="dev-0", num_samples=5)
    fed.start()
    try:
        deadline = time.monotonic() + 30
        while fed.aggregator.current is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        intruder.publish(Topics("fed").update("dev-0"), blob, qos=1).wait_for_publish(5)
        fed.wait(60)
    finally:
        conn.stop()
        fed.stop()
    (row,) = fed.aggregator.checkpoint.history()
    assert row["rejection_counts"] == {"plain-update": 1}
    assert "runs secure aggregation" in row["rejected"][0]["detail"]
    assert len(row["secure_aggregation"]["survivors"]) == 4
    assert_fedavg_of(fed, row)


def test_distributed_dp_over_secure_aggregation_sums_clipped_deltas_and_the_survivors_noise_shares(mosquitto, tmp_path):
    from flora.broker.accountant import DPSettings
    from flora.edge import dp as dp_module

    clip, z, n = 0.05, 1.0, 5
    fed = federation(mosquitto.url, tmp_path, n, drops={2: {0: "masked-input"}},
                     dp=DPSettings(clip=clip, noise_multiplier=z, mode="distributed"))
    (row,) = run(fed)
    sa = row["secure_aggregation"]
    assert [a["status"] for a in sa["attempts"]] == ["done"] and sa["dropped"] == ["dev-2"]
    survivors = sa["survivors"]
    m = len(survivors)
    assert m == 4 and row["samples"] == m  # weight 1 each, whatever the devices' sample counts
    sessions = {a.cfg.client_id: a.secure for a in fed.agents}
    share = z * clip / math.sqrt(n)  # what the round told every device
    enc = sessions["dev-0"].encodings[0]  # the round's: weight capped at 1, room for 12 sigma of noise
    assert enc.max_weight == 1 and enc.noise_bound == dp_module.integer_noise_bound(share, ENC.unit)
    unit = ENC.unit
    for session in sessions.values():  # each clipped its delta to C and drew an integer share of std zC/sqrt(n)
        assert float(np.linalg.norm(session.deltas[0])) <= clip * (1 + 1e-6)
        assert session.noises[0] is not None and session.noises[0].dtype == np.int64
    layout = fed.aggregator.secagg.layout
    start = fed.aggregator.cfg.initial_adapter
    new = fed.aggregator.global_tensors
    got = np.concatenate([np.ravel(new[k]).astype(np.float64) - np.ravel(start[k]) for k, _, _, _ in layout.entries])
    exact = sum(sessions[c].deltas[0] + sessions[c].noises[0] * unit for c in survivors) / m
    assert float(np.max(np.abs(got - exact))) <= unit + 1e-6  # the mean of clipped + noised deltas, over m
    noise = sum(sessions[c].noises[0] * unit for c in survivors)
    assert float(np.std(noise)) == pytest.approx(share * math.sqrt(m), rel=0.15)  # z C sqrt(m/n); 1,024 floats
    dp = row["dp"]
    assert dp["mode"] == "distributed" and dp["divisor"] == m and dp["shares"] == m
    assert dp["effective_noise_multiplier"] == pytest.approx(z * math.sqrt(m / n))  # the dropout caveat
