"""Secure aggregation end to end in one process (the clients' and the aggregator's state machines, a router
with scripted dropouts and a hostile broker): the sum is FedAvg's within the quantization bound, dropouts
up to k - t per neighbourhood recover, one more aborts cleanly and the retry is exact, the aggregator
never holds an individual update, and swapped keys, forged or double-listing requests are refused."""

from __future__ import annotations

import base64
import itertools
import json

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.secagg_sim import FakeClock, make_federation, run_attempt
from flora.broker.secagg.server import SecAggServer
from flora.edge import signing
from flora.edge.secagg import client as client_module
from flora.edge.secagg.client import SecAggClient
from flora.edge.secagg.encoding import Encoding, decode_sum
from flora.edge.secagg.messages import MASKED, P_KEYS, P_STAGE, REVEAL, SHARE, UNMASK, StageMsg
from flora.edge.secagg.params import SecAggParams
from flora.edge.secagg.primitives import Context
from flora.edge.secagg.ring import neighbourhoods

N, K, T, D = 10, 6, 4, 96
ENC = Encoding(clip=0.25, frac_bits=16, max_weight=1000)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return make_federation(tmp_path_factory.mktemp("pki"), N, federation="fedsa")


@pytest.fixture(scope="module")
def data(fed):
    rng = np.random.default_rng(7)
    deltas = {c: rng.uniform(-0.2, 0.2, D).astype(np.float32) for c in fed.clients}
    weights = {c: int(rng.integers(1, 1000)) for c in fed.clients}
    return deltas, weights


def params(n=N, k=K, t=T) -> SecAggParams:
    return SecAggParams.sized(n, k, t, ENC)


def fedavg_error(outcome, deltas, weights) -> float:
    """The largest difference between the decoded mean and the float64 FedAvg of the survivors, in units of
    the quantization bound (<= 1 passes)."""
    total, wsum = decode_sum(outcome.total, ENC)
    assert wsum == sum(weights[c] for c in outcome.survivors)
    exact = sum(weights[c] * deltas[c].astype(np.float64) for c in outcome.survivors) / wsum
    return float(np.max(np.abs(total / wsum - exact))) / ENC.error_bound(len(outcome.survivors), wsum)


def test_the_unmasked_sum_is_fedavg_within_the_quantization_bound(fed, data):
    deltas, weights = data
    outcome, _server, traffic = run_attempt(fed, params(), deltas, weights)
    assert outcome.status == "done", outcome.reason
    assert outcome.survivors == tuple(fed.clients) and not outcome.dropped
    assert fedavg_error(outcome, deltas, weights) <= 1.0
    assert not traffic.refusals and not traffic.rejections
    assert all(c.state == "done" for c in traffic.clients.values())


def _patterns(members, ring, limit):
    """Every set of dropouts with at most `limit` in any client's neighbourhood (and >= t + 1 left)."""
    out = []
    for size in range(1, len(members) - T):
        for drop in itertools.combinations(members, size):
            if all(len(set(ring[u]) & set(drop)) <= limit for u in members):
                out.append(drop)
    return out


def test_every_dropout_pattern_up_to_k_minus_t_per_neighbourhood_recovers(fed, data):
    members = fed.clients[:8]  # 8 on a ring of k = 6: 36 patterns of up to k - t = 2 per neighbourhood
    deltas = {c: data[0][c] for c in members}
    weights = data[1]
    ctx = Context(fed.federation, "sim", 0, 0)
    ring = neighbourhoods(members, K, ctx)
    patterns = _patterns(members, ring, K - T)
    assert len(patterns) == 36 and max(map(len, patterns)) == K - T  # 8 singles, 28 pairs
    stages = (SHARE, MASKED, UNMASK, REVEAL)
    cases = [(drop, (stage,) * len(drop)) for drop in patterns if len(drop) == 1 for stage in stages]
    cases += [(drop, tuple(itertools.islice(itertools.cycle(stages), i, i + len(drop))))
              for i, drop in enumerate(patterns) if len(drop) > 1]
    for drop, when in cases:
        drops = dict(zip(drop, when))
        outcome, _, _traffic = run_attempt(fed, params(), deltas, weights, drops=drops)
        assert outcome.status == "done", (drops, outcome.reason)
        gone_before_input = {c for c, s in drops.items() if s in (SHARE, MASKED)}
        assert set(outcome.survivors) == set(members) - gone_before_input, drops
        assert fedavg_error(outcome, deltas, weights) <= 1.0, drops


def test_one_dropout_too_many_aborts_cleanly_and_the_retry_is_exact(fed, data):
    deltas, weights = data
    ctx = Context(fed.federation, "sim", 0, 0)
    ring = neighbourhoods(fed.clients, K, ctx)
    victim = fed.clients[0]
    drops = {c: MASKED for c in (victim, *ring[victim][: K - T + 1])}  # victim keeps t - 1 holders
    outcome, server, traffic = run_attempt(fed, params(), deltas, weights, drops=drops)
    assert outcome.status == "aborted" and outcome.total is None
    assert "remain" in outcome.reason and victim in outcome.reason
    assert server.sum.size == 0  # the masked sum is dropped with the attempt
    assert {traffic.refusals[c] for c in set(fed.clients) - set(drops)} == {"aborted"}
    # the round is retried with fresh keys (attempt 1) among the clients still there
    left = {c: deltas[c] for c in fed.clients if c not in drops}
    retry, _, _ = run_attempt(fed, params(), left, weights, attempt=1)
    assert retry.status == "done" and set(retry.survivors) == set(left)
    assert fedavg_error(retry, deltas, weights) <= 1.0


def _arrays_and_bytes(obj, seen=None, depth=0):
    """Every ndarray and bytes object reachable from `obj` (the aggregator's whole state)."""
    seen = seen if seen is not None else set()
    if id(obj) in seen or depth > 12:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        yield bytes(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _arrays_and_bytes(k, seen, depth + 1)
            yield from _arrays_and_bytes(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _arrays_and_bytes(v, seen, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        yield from _arrays_and_bytes(vars(obj), seen, depth + 1)


def test_the_aggregator_never_holds_an_individual_update(fed, data, monkeypatch):
    deltas, weights = data
    found, secrets, encodings = [], {}, {}
    real_encode = client_module.encode

    def recording_encode(delta, weight, *a, **kw):
        out = real_encode(delta, weight, *a, **kw)
        encodings[weight] = out.values.copy()  # the weights are distinct: one encoding per client
        return out

    monkeypatch.setattr(client_module, "encode", recording_encode)
    by_weight = {w: c for c, w in weights.items()}
    assert len(by_weight) == N

    def watch(server, clients):
        secrets.update({c: [d.tobytes()[4:-4]] for c, d in deltas.items() if c not in secrets})
        for w, values in encodings.items():
            secrets[by_weight[w]][1:] = [values.tobytes()[8:-8]]
        for thing in _arrays_and_bytes(server):
            raw = thing.tobytes() if isinstance(thing, np.ndarray) else thing
            for c, stretches in secrets.items():
                if any(s in raw for s in stretches):  # any long stretch of one client's update
                    found.append((c, server.stage))

    outcome, _, _ = run_attempt(fed, params(), deltas, weights,
                                drops={fed.clients[2]: MASKED, fed.clients[5]: REVEAL}, watch=watch)
    assert outcome.status == "done"
    assert len(encodings) == N - 1  # all but the client that dropped before its masked input
    assert not found, found[:5]
    one = fed.clients[0]  # the scan does find an update where one is held (the client's encoding)
    assert any(secrets[one][1] in (t.tobytes() if isinstance(t, np.ndarray) else t)
               for t in _arrays_and_bytes({"kept": encodings}))
    assert fedavg_error(outcome, deltas, weights) <= 1.0


def _rewrite(payload: bytes, key: Ed25519PrivateKey, purpose: str, federation: str, edit) -> bytes:
    """The payload's body edited by `edit(dict)`, signed again with `key` (a forger's or the aggregator's)."""
    body = json.loads(signing.body_of(payload))
    edit(body)
    return signing.sign(key, purpose, federation, json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def test_a_broker_that_swaps_a_public_key_is_caught_by_the_signature(fed, data):
    deltas, weights = data
    victim = fed.clients[3]
    attacker = Ed25519PrivateKey.generate()
    evil_key = "A" * 43 + "="

    def swap_advert(kind, client, payload):
        if kind == "up" and client == victim and b'"type":"keys"' in payload:
            body = signing.body_of(payload).replace(b'"c_key":"', b'"c_key":"' + evil_key.encode() + b'","x":"')
            signature = payload[len(signing.MAGIC): len(signing.MAGIC) + 64]
            return signing.MAGIC + signature + body  # the device's signature over other bytes
        return payload

    outcome, _, traffic = run_attempt(fed, params(), deltas, weights, tamper=swap_advert)
    assert (victim, "bad-signature") in traffic.rejections
    assert outcome.status == "done" and victim not in outcome.survivors  # the round goes on without it

    def swap_relayed(kind, client, payload):  # a broker (or the aggregator) swaps a neighbour's relayed key
        if kind != "inbox" or client != fed.clients[0] or b'"stage":"share-keys"' not in payload:
            return payload
        body = json.loads(payload)
        peer = sorted(body["keys"])[0]
        advert = base64.b64decode(body["keys"][peer])
        forged = json.loads(signing.body_of(advert))
        forged["c_key"] = evil_key
        raw = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode()
        resigned = signing.sign(attacker, P_KEYS, fed.federation, raw)  # signed, but by no enrolled device
        unsigned = advert[:len(signing.MAGIC) + 64] + raw  # the device's signature over other bytes
        body["keys"][peer] = base64.b64encode(resigned if swap_relayed.resign else unsigned).decode()
        return json.dumps(body).encode()

    for resign in (False, True):
        swap_relayed.resign = resign
        _, _, traffic = run_attempt(fed, params(), deltas, weights, tamper=swap_relayed)
        assert traffic.refusals[fed.clients[0]] == "bad-peer", resign


def test_forged_stage_messages_are_refused(fed, data):
    deltas, weights = data
    forger = Ed25519PrivateKey.generate()

    def forge(kind, client, payload):
        if kind == "stage" and b'"stage":"share-keys"' in payload:
            return _rewrite(payload, forger, P_STAGE, fed.federation, lambda b: None)
        return payload

    outcome, _, traffic = run_attempt(fed, params(), deltas, weights, tamper=forge)
    assert set(traffic.refusals.values()) == {"bad-signature"} and len(traffic.refusals) == N
    assert outcome.status == "aborted"


def _malicious_unmask(fed, edit_for):
    """A tamper hook: the aggregator itself (its key) rewrites the unmask request per recipient."""
    def tamper(kind, client, payload):
        if kind == "stage" and b'"stage":"unmask"' in payload:
            return _rewrite(payload, fed.signer, P_STAGE, fed.federation, lambda b: edit_for(client, b))
        return payload
    return tamper


def test_a_double_listed_node_is_refused(fed, data):
    deltas, weights = data
    x = fed.clients[1]

    def edit(client, body):
        body["dropped"] = [x]  # x stays in members (active) too

    outcome, server, traffic = run_attempt(fed, params(), deltas, weights, tamper=_malicious_unmask(fed, edit))
    assert {traffic.refusals[c] for c in fed.clients} == {"double-listed"}
    assert outcome.status == "aborted" and not server.seed_shares and not server.key_shares


def test_an_unmask_request_below_the_threshold_is_refused(fed, data):
    deltas, weights = data

    def edit(client, body):
        body["members"] = sorted(body["members"])[: T - 1] + ([client] if client not in body["members"][: T - 1]
                                                              else [])
        body["members"] = sorted(set(body["members"]))[: T - 1]

    _, _, traffic = run_attempt(fed, params(), deltas, weights, tamper=_malicious_unmask(fed, edit))
    assert set(traffic.refusals.values()) <= {"below-threshold", "not-member"}
    assert "below-threshold" in traffic.refusals.values()


def test_a_client_never_reveals_its_seed_to_an_aggregator_that_told_its_neighbours_it_dropped(fed, data):
    deltas, weights = data
    ring = neighbourhoods(fed.clients, K, Context(fed.federation, "sim", 0, 0))
    u = fed.clients[4]

    def edit(client, body):
        if client in ring[u]:  # u's neighbours hear that u dropped (and give shares of its mask key)
            body["members"] = [m for m in body["members"] if m != u]
            body["dropped"] = [u]

    outcome, server, traffic = run_attempt(fed, params(), deltas, weights, tamper=_malicious_unmask(fed, edit))
    assert traffic.refusals[u] == "below-threshold"  # too few neighbours vouched that u is active
    assert u not in server.seeds
    assert outcome.status == "aborted"


def test_stage_messages_parse_back(fed):
    ctx = Context(fed.federation, "sim", 2, 1)
    msg = StageMsg(UNMASK, ("a", "b"), ("c",), 12.5)
    assert StageMsg.from_body(msg.to_body(ctx), ctx) == msg


def test_hostile_bytes_are_refused_with_a_reason_never_a_crash(fed, data):
    """Every message of a real attempt, mutated (truncated, bit-flipped, re-typed JSON), is refused by the
    aggregator or the client with a reason; nothing raises past the state machines."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from flora.broker.secagg.server import SecAggServer
    from flora.edge.secagg.client import Refused

    deltas, weights = data
    captured = []

    def keep(kind, client, payload):
        captured.append((kind, client, payload))
        return payload

    run_attempt(fed, params(), deltas, weights, tamper=keep)
    ups = [c for c in captured if c[0] == "up"]
    downs = [c for c in captured if c[0] != "up"]
    assert {p[:5] for _, _, p in ups} >= {b"FLSA1", signing.MAGIC[:5]}

    def mutate(payload: bytes, how: int, where: int, value: int) -> bytes:
        if how == 0:
            return payload[: where % (len(payload) + 1)]
        if how == 1:
            i = where % len(payload)
            return payload[:i] + bytes([payload[i] ^ (value or 1)]) + payload[i + 1:]
        body = signing.body_of(payload) if signing.is_signed(payload) else payload
        try:
            d = json.loads(body)
        except ValueError:
            return payload + b"\0"
        key = sorted(d)[where % len(d)]
        d[key] = [None, "x" * 300, -1, 2 ** 70, {"a": [[[]]]}, 1.5][value % 6]
        return signing.sign(fed.signer, P_STAGE, fed.federation, json.dumps(d).encode())

    ctx = Context(fed.federation, "sim", 0, 0)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.integers(0, len(ups) - 1), st.integers(0, len(downs) - 1), st.integers(0, 2),
           st.integers(0, 10 ** 6), st.integers(0, 255))
    def check(i, j, how, where, value):
        server = SecAggServer(ctx, params(), set(deltas), fed.registry, fed.signer, D + 1, 1e12)
        kind, client, payload = ups[i]
        rej = server.handle(client, mutate(payload, how, where, value))
        assert rej is None or rej.reason
        from flora.edge.secagg.client import SecAggClient

        c = SecAggClient(ctx, fed.identities[fed.clients[0]], fed.ca, fed.signer.public_key(), params(),
                         deltas[fed.clients[0]], 5)
        c.advertise()
        kind, _, payload = downs[j]
        try:
            (c.on_stage if kind == "stage" else c.on_inbox)(mutate(payload, how, where, value))
        except Refused as exc:
            assert exc.reason

    check()


def test_client_messages_that_do_not_authenticate_are_refused_with_a_reason(fed, data):
    deltas, weights = data
    a, b, c = fed.clients[:3]

    def tamper(kind, client, payload):
        if kind != "up":
            return payload
        if client == a and payload.startswith(b"FLORA-MAC1"):  # a's shares: one bit of the tag flipped
            return payload[:10] + bytes([payload[10] ^ 1]) + payload[11:]
        if client == b and payload.startswith(b"FLSA1"):  # b's masked input: one element changed
            return payload[:-1] + bytes([payload[-1] ^ 1])
        if client == c and payload.startswith(signing.MAGIC):  # c's keys without the envelope
            return signing.body_of(payload)
        return payload

    outcome, _, traffic = run_attempt(fed, params(), deltas, weights, tamper=tamper)
    assert {(a, "bad-mac"), (b, "bad-mac"), (c, "unsigned")} <= set(traffic.rejections)
    assert outcome.status == "done" and not {a, b, c} & set(outcome.survivors)
    assert fedavg_error(outcome, deltas, weights) <= 1.0


def test_a_client_gives_an_attempt_up_one_stage_timeout_after_the_stage_deadline(fed, data):
    """The next stage message is sent when the aggregator closes the stage (at its deadline at the latest): a
    client that gave up at the deadline itself would race it, so it waits one stage timeout more."""
    deltas, weights = data
    p = params()
    clock = FakeClock()
    ctx = Context(fed.federation, "sim", 0, 0)
    server = SecAggServer(ctx, p, set(deltas), fed.registry, fed.signer, D + 1, clock() + 600.0, clock)
    server.start()
    clients = {c: SecAggClient(ctx, fed.identities[c], fed.ca, fed.signer.public_key(), p, deltas[c], weights[c],
                               clock) for c in fed.clients}
    for c, sc in clients.items():
        server.handle(c, sc.advertise())
    out, outcome = server.step()
    (share_stage,) = [m for m in out if m.kind == "stage"]
    me = clients[fed.clients[0]]
    me.on_stage(share_stage.payload)
    assert outcome is None and me.deadline == clock() + p.stage_timeout_s
    clock.now = me.deadline + 0.5 * p.stage_timeout_s
    assert not me.expired() and me.state != client_module.FAILED
    clock.now = me.deadline + p.stage_timeout_s
    assert me.expired() and me.reason == client_module.TIMEOUT
