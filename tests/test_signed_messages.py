"""Signed aggregator messages end to end: the aggregator signs `global` and `round` with the federation's key
in its state dir, agents that trust the key refuse anything else with a reason, and on an open mosquitto
forged globals and rounds (round 10^12 among them) change nothing: the federation finishes."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flora.broker.enroll import AGGREGATOR_KEY, FederationPKI, aggregator_signer
from flora.edge import adapter, signing
from flora.edge.agent_rules import Trust
from flora.edge.errors import FloraError
from flora.edge.fileio import sha256_bytes
from flora.edge.identity import aggregator_key
from flora.edge.mqtt import BrokerConfig, Connection, make_client
from flora.edge.protocol import RoundAnnouncement, Status, Topics, TrainConfig
from flora.edge.synthetic import random_adapter, synthetic_manifest

from .fakes import FakeClock, LiveFederation, offer_round, offline_agent, offline_aggregator, status

M = synthetic_manifest()


def started(tmp_path, **kw):
    agg = offline_aggregator(tmp_path / "agg", FakeClock(), rounds=2, **kw)
    agg._resume_or_start()
    agg.connections = 1
    return agg


def test_the_aggregator_signs_global_and_round_with_its_key_and_the_round_names_the_body(tmp_path):
    agg = started(tmp_path, sign="yes")
    key = aggregator_key(file=tmp_path / "agg" / "aggregator.pub")
    agg._publish(agg.topics.global_, agg.global_blob, retain=True)
    agg.handle("status", "a", status("a"))
    agg._open_round()
    (g,) = agg.client.of("global")
    (r,) = agg.client.of("round")
    body = signing.verify(key, "global", "fed", g)
    assert body == agg.global_blob and adapter.decode(body).meta.round == 0
    announced = RoundAnnouncement.from_json(signing.verify(key, "round", "fed", r))
    assert announced.global_sha256 == sha256_bytes(body) and announced.clients == ["a"]
    with pytest.raises(signing.SignatureError):
        signing.verify(key, "round", "fed", g)  # a global's signature is no round's


def test_auto_signs_only_where_enrollment_made_the_key_and_a_state_dir_of_another_federation_is_refused(tmp_path):
    assert aggregator_signer(tmp_path / "open", "fed") is None  # an open federation, as before
    agg = started(tmp_path / "x")
    agg._publish(agg.topics.global_, agg.global_blob, retain=True)
    assert agg.client.of("global") == [agg.global_blob]  # unsigned
    FederationPKI(tmp_path / "enrolled", "fed").enroll("pi-1", tmp_path / "pi-1")
    assert aggregator_signer(tmp_path / "enrolled", "fed") is not None
    assert aggregator_signer(tmp_path / "enrolled", "fed", "no") is None
    with pytest.raises(FloraError, match="enrolls federation 'fed', not 'other'"):
        aggregator_signer(tmp_path / "enrolled", "other")
    assert not (tmp_path / "open" / AGGREGATOR_KEY).exists()
    aggregator_signer(tmp_path / "open", "fed", "yes")
    assert (tmp_path / "open" / AGGREGATOR_KEY).exists()


def test_ours_goes_back_over_a_foreign_global_or_round_at_most_every_few_seconds(tmp_path):
    agg = started(tmp_path, sign="yes")
    agg._publish(agg.topics.global_, agg.global_blob, retain=True)
    ours = agg.client.of("global")[0]

    def foreign(payload: bytes, mid: int) -> None:
        agg._on_message(agg.client, None, SimpleNamespace(topic=agg.topics.global_, payload=payload, mid=mid, qos=1))
        agg._drain(0)

    foreign(ours, 1)  # the retained copy of our own, delivered on (re)subscribing: nothing to do
    assert agg.client.of("global") == [ours]
    foreign(b"forged", 2)
    assert agg.client.of("global") == [ours, ours] and agg.client.published[-1].retain
    foreign(b"forged again", 3)  # within REPUBLISH_EVERY_S: not a publish war
    assert agg.client.of("global") == [ours, ours]
    assert agg.client.acked() == [1, 2, 3]


def test_an_agent_that_trusts_the_key_trains_on_signed_messages_and_refuses_forgeries_with_a_reason(tmp_path):
    key = Ed25519PrivateKey.generate()
    agent = offline_agent(tmp_path / "state", trust=Trust("fed", key.public_key()))
    forged = offer_round(agent, 0)  # unsigned global and round, as an open broker lets anyone publish
    assert agent.pump() is True
    assert agent.client.of("update") == [] and agent.global_ is None and agent.round is None
    refusals = agent.client.statuses()
    assert [(s.state, s.error_code, s.round) for s in refusals] == [("error", "unsigned", None)] * 2
    assert "refused a global message: unsigned" in refusals[0].last_error
    # the genuine messages, signed, are trained on; a forgery beside them changes nothing
    tensors = random_adapter(M, 3)
    blob = adapter.encode(tensors, model_id=M.model_id, round=0, kind="global")
    ann = RoundAnnouncement(0, M.model_id, "training", TrainConfig(batch_size=4), "all", time.time() + 60,
                            sha256_bytes(blob), 2, run_id="run-a")
    agent.events.put(("global", signing.sign(key, "global", "fed", blob)))
    agent.events.put(("round", signing.sign(key, "round", "fed", ann.to_json())))
    agent.events.put(("global", signing.sign(Ed25519PrivateKey.generate(), "global", "fed", forged)))
    agent.events.put(("round", signing.sign(key, "global", "fed", ann.to_json())))  # a global's signature
    assert agent.pump() is True
    (update,) = agent.client.of("update")
    assert adapter.decode(update).meta.round == 0
    codes = [s.error_code for s in agent.client.statuses()[2:] if s.state == "error"]
    assert codes == ["bad-signature", "bad-signature"]


@pytest.mark.mqtt
def test_on_an_open_broker_forged_globals_and_rounds_are_refused_and_the_federation_finishes(mosquitto, tmp_path):
    pki = FederationPKI(tmp_path / "federation" / "aggregator", "fed")
    pki.ensure()
    trusted = Trust("fed", pki.signer().public_key())
    fed = LiveFederation(mosquitto.url, tmp_path / "federation", 3,
                         aggregator_kw=dict(rounds=3, sign="auto"), agent_kw=lambda i: dict(trust=trusted))
    topics = Topics("fed")
    cfg = BrokerConfig.from_url(mosquitto.url)
    forger = make_client(cfg, "forger")
    seen = []
    forger.on_message = lambda c, u, m: seen.append((m.topic, bytes(m.payload)))
    conn = Connection(cfg, forger, on_connected=lambda c: c.subscribe(topics.all_status, qos=1))
    conn.start(timeout=10)
    poison = adapter.encode({k: np.full_like(v, 1e3) for k, v in random_adapter(M, 9).items()}, model_id=M.model_id,
                            round=0, kind="global")
    forgeries = []
    for number in (0, 10 ** 8, 10 ** 12):
        ann = RoundAnnouncement(0, M.model_id, "training", TrainConfig(batch_size=4), "all", time.time() + 600,
                                sha256_bytes(poison), 3, run_id="forged")
        text = ann.to_json().replace(b'"round":0', b'"round":%d' % number)
        forgeries += [(topics.global_, poison), (topics.round, text),
                      (topics.round, signing.sign(Ed25519PrivateKey.generate(), "round", "fed", text))]
    try:
        for topic, payload in forgeries[:3]:  # before anything: the retained messages agents meet first
            forger.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
        fed.start()
        deadline = time.monotonic() + 60
        while fed.aggregator.state is None or fed.aggregator.state.round < 1:
            assert time.monotonic() < deadline, "round 0 did not close"
            time.sleep(0.05)
        for topic, payload in forgeries[3:]:  # in the middle of the run, retained, over the aggregator's
            forger.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
        fed.wait(90)
    finally:
        conn.stop()
        fed.stop()
    history = fed.aggregator.checkpoint.history()
    assert [r["round"] for r in history] == [0, 1, 2] and all(r["num_reported"] == 3 for r in history)
    final = fed.aggregator.global_tensors
    assert max(float(np.abs(v).max()) for v in final.values()) < 10  # the poisoned 1e3 global never trained on
    for agent in fed.agents:
        assert agent.state.last_submitted_round == 2 and agent.done  # never silenced by round 10^8 or 10^12
        mine = [Status.from_json(p) for t, p in seen if t == topics.status(agent.cfg.client_id) and p]
        refused = {(s.error_code, s.round) for s in mine if s.state == "error"}
        assert refused == {("unsigned", None), ("bad-signature", None)}
    assert fed.results["aggregator"] == 0


def test_the_enrollment_snippet_is_a_flora_agent_config_and_names_the_key_the_aggregator_signs_with(tmp_path):
    from flora.edge.agent import AgentConfig, open_trust
    from flora.edge.cli import build_parser
    from flora.edge.config import apply_config, load_toml

    pki = FederationPKI(tmp_path / "state", "lab")
    out = pki.enroll("pi-1", tmp_path / "pi-1")
    parser = build_parser()
    argv = ["--config", str(out / "agent.toml")]
    args = apply_config(parser.commands["run"], parser.parse_args(["run", *argv]), argv, load_toml(out / "agent.toml"))
    assert (args.client_id, args.federation, args.identity_dir) == ("pi-1", "lab", out.resolve())
    cfg = AgentConfig(bundle=tmp_path, data=tmp_path, broker=BrokerConfig.from_args(args), client_id="pi-1",
                      federation="lab", aggregator_key=args.aggregator_key, identity_dir=args.identity_dir)
    signed = signing.sign(pki.signer(), "round", "lab", b"{}")
    assert signing.verify(open_trust(cfg).aggregator_key, "round", "lab", signed) == b"{}"
    by_folder = AgentConfig(bundle=tmp_path, data=tmp_path, broker=cfg.broker, client_id="pi-1", federation="lab",
                            identity_dir=out)  # aggregator.pub of the enrollment folder
    assert open_trust(by_folder).aggregator_key.public_bytes_raw() == pki.signer().public_key().public_bytes_raw()
    (tmp_path / "bad.pub").write_text("not base64!\n")
    with pytest.raises(FloraError, match=r"bad\.pub: not a base64 Ed25519 public key"):
        open_trust(AgentConfig(bundle=tmp_path, data=tmp_path, broker=cfg.broker, client_id="pi-1",
                               aggregator_key_file=tmp_path / "bad.pub"))
