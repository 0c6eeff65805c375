"""Secure aggregation in the agent and the aggregator without a broker (FakeMqttClient): what an enrolled agent
sends in a secure round (never its update in the clear), what an unenrolled or masked-only one refuses, and
the combinations the aggregator and the CLIs refuse before anything runs."""

from __future__ import annotations

import time

import pytest

from flora.broker.enroll import FederationPKI
from flora.broker.secure_round import SecureSettings
from flora.edge import adapter, signing
from flora.edge.agent import AgentConfig, open_secure, open_trust
from flora.edge.errors import ConfigError, FloraError
from flora.edge.fileio import sha256_bytes
from flora.edge.protocol import RoundAnnouncement, TrainConfig
from flora.edge.secagg.messages import ADVERTISE, P_KEYS, P_STAGE, KeysMsg, StageMsg
from flora.edge.secagg.primitives import Context
from flora.edge.state import OUTBOX_FILE
from flora.edge.synthetic import random_adapter, synthetic_manifest

from .fakes import OFFLINE_BROKER, FakeClock, enrolled, offline_agent, offline_aggregator, status

M = synthetic_manifest()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pki = FederationPKI(tmp_path_factory.mktemp("aggregator"), "fed")
    pki.ensure()
    return pki


def secure_round(pki, agent, round_: int = 0, clients="all"):
    """Queue a signed global, a signed secure round announcement and its signed advertise-keys stage."""
    signer = pki.signer()
    blob = adapter.encode(random_adapter(M, 0), model_id=M.model_id, round=round_, kind="global")
    params = SecureSettings().params(5).to_json()
    ann = RoundAnnouncement(round_, M.model_id, "training", TrainConfig(batch_size=4), clients, time.time() + 60,
                            sha256_bytes(blob), 3, run_id="run-s", secagg=params)
    stage = StageMsg(ADVERTISE, ("dev-1", "dev-2", "dev-3", "dev-4"), deadline=time.time() + 60)
    agent.events.put(("global", signing.sign(signer, "global", "fed", blob)))
    agent.events.put(("round", signing.sign(signer, "round", "fed", ann.to_json())))
    agent.events.put(("secagg-stage", signing.sign(signer, P_STAGE, "fed",
                                                   stage.to_body(Context("fed", "run-s", round_, 0)))))


def test_an_enrolled_agent_trains_a_secure_round_once_and_advertises_signed_keys_never_its_update(pki, tmp_path):
    agent = offline_agent(tmp_path / "state", **enrolled(pki, "dev-1", tmp_path / "dev-1"))
    secure_round(pki, agent)
    assert agent.pump() is True
    assert agent.client.of("update") == [] and not (tmp_path / "state" / OUTBOX_FILE).exists()
    assert len(agent.trainer.steps) == 5  # trained (18 images, batch 4)
    assert agent.state.last_submitted_round is None  # not given yet: an abort leaves it for the next attempt
    (keys,) = agent.client.of("secagg")
    identity = pki.identity_keys()["dev-1"]
    msg = KeysMsg.from_body(signing.verify(identity, P_KEYS, "fed", keys), Context("fed", "run-s", 0, 0))
    assert msg.client == "dev-1"
    assert agent.client.published[-2].topic == "flora/fed/metrics/dev-1"  # metrics as usual
    for _ in range(3):  # the update waits for an attempt: never trained again
        assert agent.pump() is True
    assert len(agent.trainer.steps) == 5 and agent.secure.holding == ("run-s", 0)


def test_an_agent_without_an_identity_refuses_a_secure_round_and_says_so_for_that_round(pki, tmp_path):
    agent = offline_agent(tmp_path / "state", trust=enrolled(pki, "dev-2", tmp_path / "dev-2")["trust"])
    secure_round(pki, agent, round_=3)
    assert agent.pump() is True
    assert agent.trainer.steps == [] and agent.client.of("update") == [] and agent.client.of("secagg") == []
    (refusal,) = [s for s in agent.client.statuses() if s.state == "error"]
    assert (refusal.error_code, refusal.round) == ("secure-aggregation-unavailable", 3)  # it settles round 3


def test_a_masked_only_agent_refuses_plain_rounds(pki, tmp_path):
    from .fakes import offer_round

    agent = offline_agent(tmp_path / "state", secure_aggregation=True, **enrolled(pki, "dev-3", tmp_path / "dev-3"))
    agent.trust = type(agent.trust)("fed")  # an open broker's plain round, unsigned
    offer_round(agent, 0)
    assert agent.pump() is True
    assert agent.trainer.steps == [] and agent.client.of("update") == []
    assert [s.error_code for s in agent.client.statuses() if s.state == "error"] == ["secure-aggregation-required"]


def test_the_agents_secure_options_are_checked_before_anything_loads(pki, tmp_path):
    def cfg(**kw):
        return AgentConfig(bundle=tmp_path, data=tmp_path, broker=OFFLINE_BROKER, client_id="dev-4", federation="fed",
                           **kw)

    with pytest.raises(ConfigError, match="--secure-aggregation needs --identity-dir"):
        open_secure(cfg(secure_aggregation=True), open_trust(cfg()))
    folder = pki.enroll("dev-4", tmp_path / "dev-4")
    (folder / "aggregator.pub").unlink()
    with pytest.raises(ConfigError, match="no aggregator key"):
        open_secure(cfg(identity_dir=folder), open_trust(cfg(identity_dir=folder)))
    other = FederationPKI(tmp_path / "other", "fed").enroll("dev-4", tmp_path / "other-dev-4")
    (folder / "identity.crt").write_bytes((other / "identity.crt").read_bytes())  # another CA's certificate
    with pytest.raises(FloraError, match="not issued by the federation's CA"):
        open_secure(cfg(identity_dir=folder), open_trust(cfg(identity_dir=other)))


@pytest.mark.parametrize("strategy", ["median", "norm-bound", "trimmed-mean"])
def test_a_strategy_that_looks_at_each_update_cannot_run_under_secure_aggregation(tmp_path, strategy):
    options = {"norm-bound": {"max_norm": 1.0}}.get(strategy, {})
    with pytest.raises(ConfigError, match=f"--strategy {strategy}: .* looks at each update on its own"):
        offline_aggregator(tmp_path, FakeClock(), rounds=1, strategy=strategy, strategy_options=options,
                           secure_aggregation=True)


def test_the_secure_aggregator_needs_the_federations_keys_and_asks_enrolled_devices_only(pki, tmp_path):
    agg = offline_aggregator(tmp_path / "open", FakeClock(), rounds=1, secure_aggregation=True)
    with pytest.raises(ConfigError, match="needs the federation's keys"):
        agg._resume_or_start()
    state = pki.state_dir
    for device in ("dev-5", "dev-6", "dev-7"):
        pki.enroll(device, tmp_path / device)
    agg = offline_aggregator(state, FakeClock(), rounds=1, secure_aggregation=True)
    agg._resume_or_start()
    agg.connections = 1
    for device in ("dev-5", "dev-6", "dev-7", "stranger"):
        agg.handle("status", device, status(device))
    agg._open_round()
    assert "stranger" not in agg.current.asked and {"dev-5", "dev-6", "dev-7"} <= agg.current.asked
    (ann,) = agg.client.of("round")
    announced = RoundAnnouncement.from_json(signing.body_of(ann))
    assert announced.secure and announced.secagg["shares"] >= 2
    stage = agg.client.of("secagg")
    assert len(stage) == 1 and agg.client.published[-1].retain  # the advertise-keys stage, retained
    assert agg.checkpoint.load_secure(0)["attempt"] == 0  # saved before it went out
