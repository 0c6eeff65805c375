"""The secure round's attempts as pure state machines: the aggregator's SecureRound and the devices'
SecureSessions, wired by an in-memory router (no MQTT, a fake clock). What an abort leaves for the retry,
who is exposed and never asked again, what a restart aborts, and what the sessions refuse."""

from __future__ import annotations

from typing import Dict, List, Optional, Set

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.secagg_sim import FakeClock, make_federation
from flora.broker.secagg.server import Outgoing
from flora.broker.secure_round import RESTARTED, SecureRound, SecureSettings
from flora.edge import signing
from flora.edge.errors import ConfigError, FloraError
from flora.edge.secagg.encoding import Encoding, decode_sum
from flora.edge.secagg.messages import ADVERTISE, MASKED, P_STAGE, SHARE, UNMASK, KeysMsg, StageMsg, peek_context
from flora.edge.secagg.primitives import Context
from flora.edge.secagg.session import SecureSession

N, D = 6, 40
ENC = Encoding(clip=0.5, frac_bits=16, max_weight=1000)
ORDER = ("advertise-keys", "share-keys", "masked-input", "unmask", "reveal", "abort")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return make_federation(tmp_path_factory.mktemp("pki"), N, federation="fedr")


class Router:
    """The aggregator's SecureRound and every device's SecureSession; `drops[(attempt, device)] = stage`: the
    device hears and says nothing from that stage on in that attempt (it is back for the next one)."""

    def __init__(self, fed, clock: FakeClock, params, max_attempts: int = 3, saved=None) -> None:
        self.fed, self.clock = fed, clock
        key = fed.signer.public_key()
        self.sessions = {c: SecureSession(fed.identities[c], fed.ca, key, clock) for c in fed.clients}
        self.round = SecureRound("fedr", "run", 4, params, max_attempts, fed.registry, fed.signer, D + 1, clock,
                                 saved)
        self.drops: Dict[tuple, str] = {}
        rng = np.random.default_rng(3)
        self.deltas = {c: rng.uniform(-0.3, 0.3, D) for c in fed.clients}
        self.weights = {c: int(rng.integers(1, 100)) for c in fed.clients}
        self.sent: Dict[str, List[bytes]] = {c: [] for c in fed.clients}

    def join(self, clients=None) -> None:
        for c in clients or self.fed.clients:
            self.sessions[c].begin("run", 4, self.round.params)
            self.sessions[c].trained(self.deltas[c], self.weights[c])

    def _silent(self, c: str, attempt: int, stage: str) -> bool:
        drop = self.drops.get((attempt, c))
        return drop is not None and ORDER.index(stage) >= ORDER.index(drop)

    def deliver(self, out: List[Outgoing]) -> None:
        for msg in out:
            body = signing.body_of(msg.payload) if msg.kind == "stage" else msg.payload
            ctx = peek_context(body, "fedr")
            if msg.kind == "stage":
                stage = StageMsg.from_body(body, ctx).stage
                targets = [c for c in self.fed.clients if not self._silent(c, ctx.attempt, stage)]
                steps = [(c, self.sessions[c].on_stage(msg.payload)) for c in targets]
            else:
                stage = self.round.server.stage if self.round.server else "abort"
                if self._silent(msg.client, ctx.attempt, stage):
                    continue
                steps = [(msg.client, self.sessions[msg.client].on_inbox(msg.payload))]
            for c, step in steps:
                for reply in step.replies:
                    self.sent[c].append(reply)
                    self.round.handle(c, reply)

    def attempt(self, asked: Optional[Set[str]] = None):
        """Run one attempt to its end; its outcome."""
        self.deliver(self.round.start(set(asked or self.fed.clients), self.clock.now + 100))
        for _ in range(20):
            out, outcome = self.round.step()
            if not out and outcome is None:
                self.clock.now = self.round.deadline + 0.001  # someone is missing: the stage times out
                out, outcome = self.round.step()
            self.deliver(out)
            if outcome is not None:
                return outcome
        raise AssertionError("the attempt did not end")

    def fedavg_error(self, outcome) -> float:
        total, weight = decode_sum(outcome.total, ENC)
        exact = sum(self.weights[c] * self.deltas[c] for c in outcome.survivors)
        assert weight == sum(self.weights[c] for c in outcome.survivors)
        return float(np.max(np.abs(total / weight - exact / weight))) / ENC.error_bound(len(outcome.survivors), weight)


def params(n: int = N):
    return SecureSettings(encoding=ENC, stage_timeout_s=10).params(n)  # k = 4, t = 3 for 6


def test_an_abort_before_unmask_exposes_no_one_and_the_retry_with_fresh_keys_sums_everyone_once(fed):
    r = Router(fed, FakeClock(), params())
    r.join()
    for c in fed.clients[:3]:  # three drop before their masked input: 3 left, 4 needed
        r.drops[(0, c)] = MASKED
    first = r.attempt()
    assert first.status == "aborted" and "3 client(s) completed masked-input, 4 needed" in first.reason
    assert r.round.exposed == set() and all(s.holding == ("run", 4) for s in r.sessions.values())
    sent0 = {c: len(r.sent[c]) for c in fed.clients}
    second = r.attempt()
    assert second.status == "done" and second.survivors == tuple(fed.clients)
    assert r.fedavg_error(second) <= 1.0
    for c in fed.clients:  # attempt 1 advertised fresh keys, for attempt 1
        k0, k1 = (KeysMsg.from_body(signing.body_of(r.sent[c][i]), Context("fedr", "run", 4, a))
                  for i, a in ((0, 0), (sent0[c], 1)))
        assert (k0.c_key, k0.s_key, k0.commit) != (k1.c_key, k1.s_key, k1.commit) and k0.c_key != k1.c_key
    assert [(a.attempt, a.status) for a in r.round.attempts] == [(0, "aborted"), (1, "done")]
    assert all(s.given for s in r.sessions.values())


def test_after_an_unmask_request_the_listed_clients_are_exposed_and_never_asked_again(fed):
    r = Router(fed, FakeClock(), params())
    r.join()
    d = fed.clients[0]
    r.drops[(0, d)] = MASKED  # d drops: its mask key must come back from t = 3 of its 4 neighbours
    holders = [c for c in fed.clients if c != d][:2]
    for c in holders:  # two of them drop at unmask: only 2 key shares of d can come back
        r.drops[(0, c)] = UNMASK
    first = r.attempt()
    assert first.status == "aborted" and f"dropped client {d}'s mask key" in first.reason
    assert r.round.exposed == set(fed.clients) - {d}  # their inputs went into an unmask request
    listened = set(fed.clients) - {d} - set(holders)
    assert {c for c, s in r.sessions.items() if s.given} == listened  # those that saw the request know it
    assert r.round.candidates(set(fed.clients)) == {d}  # the retry may ask d alone
    second = r.attempt()
    assert second.status == "aborted" and "1 client(s) completed advertise-keys" in second.reason
    saved = r.round.to_json()
    assert saved["exposed"] == sorted(r.round.exposed) and saved["attempt"] == 1 and not saved["running"]


def test_an_aggregator_that_asks_a_given_update_again_gets_nothing_from_its_device(fed):
    r = Router(fed, FakeClock(), params())
    r.join()
    assert r.attempt().status == "done"
    forgetful = SecureRound("fedr", "run", 4, r.round.params, 3, fed.registry, fed.signer, D + 1, r.clock)
    forgetful.attempt = 0  # a (malicious) aggregator that forgot who is exposed, asking everyone in attempt 1
    r.round = forgetful
    before = {c: len(r.sent[c]) for c in fed.clients}
    assert r.attempt().status == "aborted"
    assert {c: len(r.sent[c]) for c in fed.clients} == before  # no device advertised: the sum cannot be redone


def test_a_restart_aborts_the_running_attempt_counts_it_and_the_next_attempt_completes(fed):
    clock = FakeClock()
    r = Router(fed, clock, params())
    r.join()
    r.deliver(r.round.start(set(fed.clients), clock.now + 100))
    for _ in range(2):  # advertise-keys, then share-keys closed: masked-input is open
        out, _ = r.round.step()
        r.deliver(out)
    assert r.round.server.stage == MASKED and r.round.running
    saved = r.round.to_json()
    restarted = Router(fed, clock, SecureRound.saved_params(saved), saved=saved)
    restarted.sessions, restarted.deltas, restarted.weights = r.sessions, r.deltas, r.weights
    aborts = restarted.round.interrupted(saved)
    assert len(aborts) == 1
    stage = StageMsg.from_body(signing.verify(fed.signer.public_key(), P_STAGE, "fedr", aborts[0].payload),
                               Context("fedr", "run", 4, 0))
    assert (stage.stage, stage.reason) == ("abort", RESTARTED)
    restarted.deliver(aborts)
    assert all(s.client.state == "failed" for s in restarted.sessions.values())
    outcome = restarted.attempt()
    assert outcome.status == "done" and restarted.round.attempt == 1
    assert [(a.attempt, a.status, a.reason) for a in restarted.round.attempts] == [
        (0, "aborted", RESTARTED), (1, "done", "")]
    assert restarted.fedavg_error(outcome) <= 1.0


def test_the_attempts_are_bounded(fed):
    r = Router(fed, FakeClock(), params(), max_attempts=2)
    r.join()
    for attempt in (0, 1):
        for c in fed.clients[:3]:
            r.drops[(attempt, c)] = SHARE
        assert r.attempt().status == "aborted"
    assert r.round.attempts_left == 0
    with pytest.raises(RuntimeError, match="all 2 attempts were made"):
        r.round.start(set(fed.clients), 1e9)


def test_a_session_refuses_forged_stages_and_keeps_another_rounds_stage_for_when_it_begins(fed):
    clock = FakeClock()
    c = fed.clients[0]
    session = SecureSession(fed.identities[c], fed.ca, fed.signer.public_key(), clock)
    ctx = Context("fedr", "run", 4, 0)
    body = StageMsg(ADVERTISE, tuple(fed.clients), deadline=clock.now + 50).to_body(ctx)
    forged = signing.sign(Ed25519PrivateKey.generate(), P_STAGE, "fedr", body)
    step = session.on_stage(forged)
    assert step.replies == [] and "refused a secure-aggregation stage message: bad-signature" in step.notes[0][1]
    assert session.on_stage(body).notes[0][1].startswith("refused a secure-aggregation stage message: unsigned")
    genuine = signing.sign(fed.signer, P_STAGE, "fedr", body)
    assert session.on_stage(genuine).replies == []  # no round announced yet: kept
    session.begin("run", 4, params())
    assert session.trained(np.zeros(D), 5).replies != []  # the kept advertise-keys stage, answered once trained
    assert session.on_stage(genuine).replies == []  # its retained copy again: answered once
    assert session.holding == ("run", 4)
    session.begin("run", 5, params())  # the next round: the update of round 4 is gone
    assert session.holding is None


def test_settings_refuse_what_cannot_be_sound():
    with pytest.raises(FloraError, match="must be > shares/2"):
        SecureSettings(shares=4, threshold=2)
    with pytest.raises(ConfigError, match="--threshold needs --shares"):
        SecureSettings(threshold=3)
    with pytest.raises(ConfigError, match="--max-attempts"):
        SecureSettings(max_attempts=0)
    p = SecureSettings().params(5)
    assert (p.shares, p.threshold, p.min_members()) == (4, 3, 4)  # 5 devices tolerate one dropout
    assert SecureSettings().params(100, min_clients=30).min_survivors == 30
