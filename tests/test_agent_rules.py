"""The agent's rules (flora.edge.agent_rules) as pure decisions: no bundle, no broker, no torch, no onnxruntime.

test_agent_offline.py drives the whole agent through the same rules with fakes, and checks that neither of
the two modules imports torch or onnxruntime.
"""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flora.edge import adapter, signing
from flora.edge import agent_rules as rules
from flora.edge.agent_rules import (
    ERROR,
    INFO,
    WARNING,
    AgentView,
    Finish,
    GlobalAdapter,
    Idle,
    Note,
    Refused,
    Resend,
    StartRun,
    Train,
    Trust,
    adopt_state,
    authenticate,
    enter_round,
    next_action,
    read_global,
    read_round,
)
from flora.edge.fileio import sha256_bytes
from flora.edge.protocol import ROUND_DONE, RoundAnnouncement, TrainConfig
from flora.edge.state import AgentState
from flora.edge.synthetic import random_adapter, synthetic_manifest

M = synthetic_manifest()
GLOBAL = adapter.encode(random_adapter(M, 0), model_id=M.model_id, round=2, kind="global")
SHA = sha256_bytes(GLOBAL)


def announce(round_: int = 2, run_id: str = "run-a", **fields) -> RoundAnnouncement:
    base = dict(round=round_, model_id=M.model_id, state="training", config=TrainConfig(batch_size=4), clients="all",
                deadline=1e9, global_sha256=SHA, total_rounds=5, run_id=run_id)
    base.update(fields)
    return RoundAnnouncement(**base)


def view(**fields) -> AgentView:
    base = dict(client_id="dev-1", model_id=M.model_id, run_id="run-a", global_sha256=SHA)
    base.update(fields)
    return AgentView(**base)


# -- next_action ------------------------------------------------------------------------------------

def test_a_round_for_this_model_asking_this_client_with_its_global_is_trained():
    assert next_action(announce(), view()) == Train(2)
    assert next_action(announce(clients=["dev-0", "dev-1"]), view()) == Train(2)
    assert next_action(announce(3), view(last_submitted_round=2)) == Train(3)  # the next round


def test_no_round_yet_means_idle_without_a_note():
    assert next_action(None, view()) == Idle(rules.NO_ROUND)


def test_a_round_already_submitted_in_this_run_is_never_trained_again():
    for last in (2, 5):
        action = next_action(announce(2), view(last_submitted_round=last))
        assert action == Idle(rules.SUBMITTED, Note(INFO, "round 2 was already submitted", key="done-run-a/2"))


def test_a_round_that_failed_in_this_process_is_not_retried():
    action = next_action(announce(2), view(failed=frozenset({("run-a", 2)})))
    assert action.reason == rules.FAILED and action.note.key == "failed-run-a/2"
    assert action.note.text == "round 2 failed in this process: not retrying it; waiting for the next round"
    assert next_action(announce(2, run_id="run-b"), view(run_id="run-b", failed=frozenset({("run-a", 2)}))) == Train(2)
    assert next_action(announce(3), view(failed=frozenset({("run-a", 2)}))) == Train(3)


def test_the_agent_waits_for_the_global_the_round_names():
    for received in (None, "f" * 64):
        action = next_action(announce(), view(global_sha256=received))
        assert action.reason == rules.WAITING_FOR_GLOBAL
        assert action.note == Note(INFO, "round 2: waiting for its global adapter", key=f"wait-run-a/2-{received}")
    # another wrong global says so again (its own key); the right one trains
    assert next_action(announce(), view(global_sha256=None)).note.key != next_action(
        announce(), view(global_sha256="f" * 64)).note.key


def test_a_round_for_another_model_is_refused_with_an_error_once_per_round():
    action = next_action(announce(model_id="e" * 64), view())
    assert action.reason == rules.MODEL_MISMATCH and action.note.level == ERROR
    assert action.note.text == f"round 2 is for model {'e' * 16}, this bundle is {M.model_id[:16]}: not training"
    assert action.note.key == "model-run-a/2"
    assert action.status_code == "model-mismatch"  # the aggregator stops asking it: only an operator can fix it
    assert action.status_error == f"round 2 is for model {'e' * 16}, this bundle is {M.model_id[:16]}"
    # checked first: a done message for another model does not finish this agent
    assert next_action(announce(model_id="e" * 64, state=ROUND_DONE), view()).reason == rules.MODEL_MISMATCH


def test_a_round_that_does_not_ask_this_client_is_skipped():
    action = next_action(announce(clients=["dev-0", "dev-2"]), view())
    assert action == Idle(rules.NOT_ASKED, Note(INFO, "round 2 does not ask this client", key="skip-run-a/2"))
    assert next_action(announce(clients=[]), view()).reason == rules.NOT_ASKED


def test_done_finishes_once():
    done = announce(5, state=ROUND_DONE, clients=[])
    assert next_action(done, view()) == Finish(5, Note(INFO, "the federation is done after 5 rounds"))
    assert next_action(done, view(finished=True)) == Idle(rules.FINISHED)


def test_the_rules_are_checked_in_order():
    """model, done, asked, submitted, failed, global: the first that fails is the reason."""
    everything_wrong = view(last_submitted_round=9, failed=frozenset({("run-a", 2)}), global_sha256=None)
    assert next_action(announce(clients=["x"]), everything_wrong).reason == rules.NOT_ASKED
    assert next_action(announce(), everything_wrong).reason == rules.SUBMITTED
    assert next_action(announce(), dataclasses.replace(everything_wrong, last_submitted_round=1)).reason == rules.FAILED
    assert next_action(announce(), view(global_sha256=None, last_submitted_round=1)).reason == rules.WAITING_FOR_GLOBAL


# -- enter_round: a new run, the re-send after a restart ----------------------------------------------

def test_a_round_of_another_run_starts_a_fresh_record_and_says_what_it_forgets():
    v = view(last_submitted_round=3, outbox_round=3, outbox_pending=True, resend_pending=True)
    (change,) = enter_round(announce(0, run_id="run-b"), v)
    assert change == StartRun("run-b", Note(
        WARNING, "federation run run-b (the record was for run run-a): forgetting that rounds up to 3 were submitted, "
                 "dropping the unsent update of round 3"))  # ... and no re-send of the old run's update
    sent = view(last_submitted_round=3, outbox_round=3)
    assert enter_round(announce(0, run_id="run-b"), sent)[0].note.text.endswith("rounds up to 3 were submitted")
    unnamed = view(run_id="", last_submitted_round=1)
    assert "(the record was for run unnamed)" in enter_round(announce(run_id="run-b"), unnamed)[0].note.text
    fresh = (StartRun("run-b", Note(INFO, "federation run run-b")),)
    assert enter_round(announce(run_id="run-b"), view(run_id="")) == fresh


def test_the_same_run_or_an_empty_run_id_keeps_the_record():
    v = view(last_submitted_round=3)
    assert enter_round(announce(2), v) == ()
    assert enter_round(announce(2, run_id=""), v) == ()  # an older aggregator without run ids


def test_a_restarted_agent_resends_its_stored_update_only_with_nothing_in_flight():
    owed = view(last_submitted_round=3, outbox_round=3, outbox_pending=True, resend_pending=True)
    assert enter_round(announce(3), owed) == (Resend(3),)
    assert enter_round(announce(4, run_id=""), owed) == (Resend(3),)  # any round message of the same record
    assert enter_round(announce(3), dataclasses.replace(owed, in_flight=True)) == ()
    assert enter_round(announce(3), dataclasses.replace(owed, resend_pending=False)) == ()  # already re-sent
    assert enter_round(announce(3), dataclasses.replace(owed, outbox_pending=False)) == ()  # acknowledged meanwhile
    assert next_action(announce(3), owed).reason == rules.SUBMITTED  # and the round is not trained again


# -- messages -----------------------------------------------------------------------------------------

def test_a_round_message_of_a_newer_protocol_is_refused_and_the_held_round_forgotten():
    refused = read_round(announce(protocol=2).to_json())
    assert refused == Refused(
        Note(ERROR, "refused a round message of protocol 2, newer than this agent's 1: upgrade flora-agent; "
                    "waiting for a round message it understands", key="protocol-2"),
        status_error="refused round message of protocol 2, newer than this agent's 1", status_code="protocol-mismatch",
        forget_round=True)
    assert read_round(announce(protocol=7).to_json()).note.key == "protocol-7"


def test_a_malformed_round_message_is_ignored_and_the_held_round_stands():
    for payload in (b"{not json", b"[1, 2]", b'{"round": 1}', announce().to_json().replace(b'"training"', b'"gone"')):
        refused = read_round(payload)
        assert isinstance(refused, Refused) and refused.note.level == WARNING
        assert refused.note.text.startswith("ignored a malformed round message: ")
        assert refused.status_error is None and not refused.forget_round and refused.note.key == ""
    assert read_round(announce().to_json()) == announce()


def test_a_global_is_accepted_only_for_this_model_and_of_a_global_kind():
    got = read_global(GLOBAL, M)
    assert isinstance(got, GlobalAdapter) and got.sha256 == SHA and got.blob == GLOBAL and got.adapter.meta.round == 2
    initial = adapter.encode(random_adapter(M, 0), model_id=M.model_id, round=0, kind="initial")
    assert isinstance(read_global(initial, M), GlobalAdapter)
    update = adapter.encode(random_adapter(M, 0), model_id=M.model_id, round=2, kind="update", client_id="x",
                            num_samples=1)
    assert read_global(update, M) == Refused(Note(ERROR, "refused the global adapter: its kind is 'update'"))
    foreign = read_global(adapter.encode(random_adapter(M, 0), model_id="0" * 64, round=2, kind="global"), M)
    assert "is for model_id 0000" in foreign.note.text and foreign.status_error.startswith("refused global adapter: ")
    assert foreign.status_code == "model-mismatch"
    other_layout = synthetic_manifest(width=8)
    misfit = read_global(adapter.encode(random_adapter(other_layout, 0), model_id=M.model_id, round=2,
                                        kind="global"), M)
    assert "has shape [4, 8], the bundle says [4, 16]" in misfit.note.text and misfit.status_code == "bad-global"
    for junk in (b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", GLOBAL + b"\x00" * (1 << 17)):
        assert isinstance(read_global(junk, M), Refused)


# -- signatures -------------------------------------------------------------------------------------

AGGREGATOR = Ed25519PrivateKey.generate()
TRUST = Trust("fed", AGGREGATOR.public_key())


def test_with_a_trusted_key_only_what_the_aggregator_signed_for_this_topic_and_federation_is_read():
    body = announce().to_json()
    assert authenticate(signing.sign(AGGREGATOR, "round", "fed", body), "round", TRUST) == body
    assert authenticate(signing.sign(AGGREGATOR, "global", "fed", GLOBAL), "global", TRUST) == GLOBAL
    forgeries = {
        "unsigned": body,
        "bad-signature": signing.sign(Ed25519PrivateKey.generate(), "round", "fed", body),  # another key
    }
    forgeries_bad = [signing.sign(AGGREGATOR, "global", "fed", body),  # signed for the other topic
                     signing.sign(AGGREGATOR, "round", "other-fed", body),  # for another federation
                     signing.sign(AGGREGATOR, "round", "fed", body).replace(b'"round":2', b'"round":9')]  # altered
    for payload, reason in [*((p, r) for r, p in forgeries.items()), *((p, "bad-signature") for p in forgeries_bad)]:
        refused = authenticate(payload, "round", TRUST, where="run-a/2")
        assert isinstance(refused, Refused), reason
        assert refused.status_code == reason and refused.status_error.startswith(f"refused a round message: {reason}")
        assert refused.about_round is False and refused.forget_round is False  # the held round stands
        assert refused.note.level == WARNING and refused.note.key == f"{reason}-round-run-a/2"  # once per round


def test_without_a_trusted_key_messages_are_read_as_they_come_signed_or_not():
    body = announce().to_json()
    for trust in (None, Trust("fed")):
        assert authenticate(body, "round", trust) == body
        assert authenticate(signing.sign(Ed25519PrivateKey.generate(), "round", "fed", body), "round", trust) == body
    assert Trust("fed").required is False and TRUST.required is True


# -- start-up ----------------------------------------------------------------------------------------

def test_start_up_keeps_a_state_of_this_model_and_federation_and_says_where_it_resumes():
    assert adopt_state(AgentState(), M.model_id, "fed") == rules.Adoption(None)
    stored = AgentState(model_id=M.model_id, federation="fed", run_id="run-a", last_submitted_round=3,
                        outbox_round=3, outbox_sent=False)
    assert adopt_state(stored, M.model_id, "fed") == rules.Adoption(None, (
        Note(INFO, "resuming: last submitted round 3 (run run-a)"),
        Note(INFO, "the update of round 3 is stored but was not acknowledged: it is sent once more when the round "
                   "message arrives")))


@pytest.mark.parametrize(("stored", "reset", "says"), [
    (AgentState(model_id="9" * 64, federation="fed", last_submitted_round=3), rules.OTHER_MODEL,
     f"state dir /s belongs to model {'9' * 16}; this bundle is {M.model_id[:16]}: starting a fresh state"),
    (AgentState(model_id=M.model_id, federation="old-fed", last_submitted_round=3), rules.OTHER_FEDERATION,
     "state dir /s recorded the rounds of federation 'old-fed', this is 'fed': starting a fresh record of "
     "submitted rounds"),
])
def test_start_up_refuses_the_record_of_another_model_or_federation(stored, reset, says):
    assert adopt_state(stored, M.model_id, "fed", where="state dir /s") == rules.Adoption(reset, (Note(WARNING, says),))


# -- secure aggregation ------------------------------------------------------------------------------

SECAGG = {"shares": 4, "threshold": 3, "clients": 5, "bits": 64, "stage_timeout_s": 60.0, "min_survivors": 2,
          "encoding": {"clip": 1.0, "frac_bits": 16, "max_weight": 65536, "noise_bound": 0}}


def test_a_secure_round_is_trained_only_by_an_enrolled_agent_and_once():
    secure = announce(secagg=SECAGG)
    assert RoundAnnouncement.from_json(secure.to_json()) == secure and b'"secagg"' not in announce().to_json()
    unable = next_action(secure, view())
    assert unable.reason == rules.SECURE_UNAVAILABLE and unable.status_code == "secure-aggregation-unavailable"
    assert unable.note.level == ERROR and unable.note.key == "secure-run-a/2"
    assert next_action(secure, view(secure_capable=True)) == Train(2)
    holding = view(secure_capable=True, holding=("run-a", 2))
    assert next_action(secure, holding) == Idle(rules.SECURE_WAITING)  # trained: its update waits for an attempt
    assert next_action(announce(3, secagg=SECAGG), holding) == Train(3)
    assert next_action(secure, view(secure_capable=True, last_submitted_round=2)).reason == rules.SUBMITTED


def test_an_agent_that_sends_masked_updates_only_refuses_a_plain_round():
    masked_only = view(secure_capable=True, secure_required=True)
    refused = next_action(announce(), masked_only)
    assert refused.reason == rules.SECURE_REQUIRED and refused.status_code == "secure-aggregation-required"
    assert "not securely aggregated" in refused.status_error
    assert next_action(announce(secagg=SECAGG), masked_only) == Train(2)
