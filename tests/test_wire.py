"""edge.wire, the bounded decoding layer, and every parser built on it: no payload from the network raises
anything but the one error type (WireError, or the aggregator's Rejected), whatever its size, depth, numbers
or keys; thousands of random and adversarial payloads (hypothesis, derandomised so CI is reproducible)."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import asdict
from typing import Callable, Dict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flora.broker.validation import Rejected, RoundView, validate_update
from flora.edge import adapter, wire
from flora.edge.protocol import (
    METRICS_MESSAGE,
    ROUND_MESSAGE,
    STATUS_MESSAGE,
    Metrics,
    ProtocolError,
    RoundAnnouncement,
    Status,
    TrainConfig,
    check_id,
    newer_protocol,
)
from flora.edge.synthetic import encode_update, random_adapter, synthetic_manifest

from .helpers import ADVERSARIAL, adversarial_headers, header_blob, nested

M = synthetic_manifest()
LIMIT = adapter.max_blob_bytes(M.trainable)
FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ROUND = RoundAnnouncement(round=3, model_id=M.model_id, state="training", config=TrainConfig(), clients=["c1", "c2"],
                          deadline=1.7e9, global_sha256="ab" * 32, total_rounds=10, run_id="3f9c0a61d2b84e07")
STATUS = Status("c1", "idle", 3, None, 120, "step", 1.7e9)
METRICS = Metrics("c1", 3, 0.5, 0.8, 0.75, 120, 4, 1, 2.0, 0.01, 300.0, "step", {"val_loss": 0.6, "update_bytes": 9e4})


def good_update() -> bytes:
    return encode_update(M, random_adapter(M, 1), "c1", 3, 10)


def json_messages_of(seed_value: Dict) -> st.SearchStrategy[bytes]:
    """Valid messages with one field replaced, removed or added (random JSON), plus random JSON and bytes."""
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=40))
    values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)
    keys = list(seed_value)

    def mutate(args) -> bytes:
        op, key, value = args
        d = dict(seed_value)
        if op == 0:
            d[key] = value
        elif op == 1:
            d.pop(key, None)
        else:
            d[f"x{key}"] = value
        return json.dumps(d, allow_nan=True).encode()

    mutated = st.tuples(st.integers(0, 2), st.sampled_from(keys), values).map(mutate)
    raw_json = values.map(lambda v: json.dumps(v, allow_nan=True).encode())
    deep = st.integers(17, 5000).map(lambda n: nested(n).encode())
    return st.one_of(mutated, raw_json, st.binary(max_size=200), deep, st.sampled_from(ADVERSARIAL))


def outcome(parse: Callable[[bytes], object], payload: bytes, allowed=(wire.WireError,)) -> str:
    """'ok' or 'rejected'; anything else (a crash) fails the test with the payload."""
    try:
        parse(payload)
    except allowed:
        return "rejected"
    except Exception as exc:  # pragma: no cover - this is the failure being tested for
        pytest.fail(f"{type(exc).__name__}: {exc} for payload {payload[:120]!r}")
    return "ok"


# -- the layer itself ----------------------------------------------------------------------------
def test_deep_nesting_is_refused_before_json_loads_recurses():
    for depth in (17, 1000, 100_000):
        with pytest.raises(wire.WireError, match=f"nested {depth} deep"):
            wire.loads(nested(depth), 1 << 20)
    assert wire.loads(nested(16), 1 << 20) == json.loads(nested(16))
    assert wire.nesting_depth('[{"a": "[[[[{{{{", "b": ["\\"]]]"]}]') == 3  # brackets in strings do not count
    assert wire.nesting_depth("") == 0 and wire.nesting_depth("]]][[") == 0  # json.loads fails at the first ]


def test_numbers_are_checked_while_parsing():
    for text, why in [("1e400", "overflows"), ("-1e999", "overflows"), ("Infinity", "not a JSON number"),
                      ("NaN", "not a JSON number"), ("-Infinity", "not a JSON number"),
                      ("9" * 5000, "5000 digits"), ("-" + "1" * 20, "21 digits")]:
        with pytest.raises(wire.WireError, match=why):
            wire.loads(f'{{"n": {text}}}', 1 << 20)
    assert wire.loads('{"n": 9223372036854775807, "f": 1e-400, "g": -0.5}', 100) == {
        "n": 2 ** 63 - 1, "f": 0.0, "g": -0.5}


def test_size_utf8_and_duplicate_keys():
    with pytest.raises(wire.WireError, match="over the limit of 10"):
        wire.loads(b"[" * 10_000_000, 10)
    huge = b"[" * 50_000_000
    start = time.perf_counter()
    with pytest.raises(wire.WireError):
        wire.loads(huge, 1 << 10)  # refused on its length: nothing is scanned
    assert time.perf_counter() - start < 0.05
    with pytest.raises(wire.WireError, match="not UTF-8"):
        wire.loads(b'{"a": "\xff"}', 100)
    with pytest.raises(wire.WireError, match="duplicate key 'a'"):
        wire.loads('{"a": 1, "b": {"a": 2}, "a": 3}', 100)
    with pytest.raises(wire.WireError, match="not JSON"):
        wire.loads('{"a": 1,}', 100)


def test_schemas_are_exact():
    schema = wire.Object({"n": wire.Int(0, 10), "f": wire.Float(gt=0.0, hi=1.0), "s": wire.Str(4),
                          "o": wire.optional(wire.Nullable(wire.Array(wire.Str(8, wire.ID_PATTERN), 2)), [])})
    assert schema.check({"n": 3, "f": 1, "s": "ab"}, "m") == {"n": 3, "f": 1.0, "s": "ab", "o": []}
    for value, why in [({"n": 3, "f": 0.5}, "missing key 's'"),
                       ({"n": 3, "f": 0.5, "s": "a", "z": 1}, "unknown key 'z'"),
                       ({"n": True, "f": 0.5, "s": "a"}, "m.n: True is not an integer"),
                       ({"n": 3.0, "f": 0.5, "s": "a"}, "m.n: 3.0 is not an integer"),
                       ({"n": 11, "f": 0.5, "s": "a"}, r"outside \[0, 10\]"),
                       ({"n": 1, "f": 0.0, "s": "a"}, r"outside \(0, 1\]"),
                       ({"n": 1, "f": "1", "s": "a"}, "not a number"),
                       ({"n": 1, "f": 1, "s": "abcde"}, "string of 5 characters"),
                       ({"n": 1, "f": 1, "s": "\ud800"}, "lone surrogate"),
                       ({"n": 1, "f": 1, "s": "a", "o": ["a", "b", "c"]}, "array of 3 items"),
                       ({"n": 1, "f": 1, "s": "a", "o": ["a\n"]}, "does not match"),
                       ([1], "not an object")]:
        with pytest.raises(wire.WireError, match=why):
            schema.check(value, "m")


def test_check_id_is_a_full_match():
    assert check_id("c1") == "c1" and check_id("a" * 64)
    for bad in ("c1\n", "c1\r\n", "", "a" * 65, "c/1", "c+", "c#", "\nc1", "c1 ", 7, None):
        with pytest.raises(ProtocolError):
            check_id(bad)


# -- the protocol's messages ---------------------------------------------------------------------
def test_messages_round_trip_and_senders_write_what_receivers_accept():
    assert RoundAnnouncement.from_json(ROUND.to_json()) == ROUND
    assert Status.from_json(STATUS.to_json()) == STATUS
    assert Metrics.from_json(METRICS.to_json()) == METRICS
    coded = Status("c1", "error", 3, "bundle of another model", error_code="model-mismatch")
    assert Status.from_json(coded.to_json()) == coded
    for bad_code in ("Model Mismatch", "x" * 33, "-a", 7):
        with pytest.raises(ProtocolError, match="error_code"):
            Status.from_json(json.dumps({**json.loads(coded.to_json()), "error_code": bad_code}))
    long_error = Status("c1", "error", 3, "x" * 50_000)
    assert len(Status.from_json(long_error.to_json()).last_error) == 1000  # cut, not refused by the aggregator
    diverged = Metrics(**{**asdict(METRICS), "loss": float("nan"), "extra": {"val_loss": float("inf")}})
    payload = diverged.to_json()
    assert b"NaN" not in payload and b"Infinity" not in payload
    assert Metrics.from_json(payload).loss is None and Metrics.from_json(payload).extra == {"val_loss": None}
    assert RoundAnnouncement.from_json(json.dumps({k: v for k, v in json.loads(ROUND.to_json()).items()
                                                   if k not in ("protocol", "run_id")})).run_id == ""
    with pytest.raises(ValueError):
        RoundAnnouncement(**{**asdict(ROUND), "config": TrainConfig(), "round": 10 ** 12}).to_json()


def test_metrics_keep_only_the_schemas_fields_typed_and_bounded():
    d = json.loads(METRICS.to_json())
    for change, why in [({"backend": "x" * 20_000_000}, "over the limit"), ({"loss": "0.5"}, "not a number"),
                        ({"note": "x"}, "unknown key 'note'"), ({"extra": {"k": "v"}}, "not a number"),
                        ({"extra": {f"k{i}": 1.0 for i in range(33)}}, "33 entries"),
                        ({"accuracy": 1.5}, "outside"), ({"samples": -1}, "outside")]:
        with pytest.raises(ProtocolError, match=why):
            Metrics.from_json(json.dumps({**d, **change}))


def test_newer_protocol_reads_only_bounded_json():
    assert newer_protocol(json.dumps({"protocol": 2}).encode()) == 2
    assert newer_protocol(json.dumps({"protocol": 1}).encode()) is None
    for payload in (nested(5000).encode(), b'{"protocol": 1e400}', b'{"protocol": true}', b"\xff"):
        assert newer_protocol(payload) is None


def test_adapter_headers_go_through_the_layer():
    for blob in adversarial_headers():
        with pytest.raises(adapter.AdapterError):
            adapter.read_header(blob)
        with pytest.raises(Rejected) as err:
            validate_update(blob, "c1", M, RoundView(3, {"c1"}, set()), LIMIT)
        assert err.value.reason in ("malformed", "oversized"), err.value
    assert isinstance(adapter.AdapterError("x"), wire.WireError)
    entries, meta = adapter.read_header(good_update())
    assert meta["num_samples"] == "10" and len(entries) == len(M.trainable)


# -- fuzz: thousands of payloads at every parser ---------------------------------------------------
PARSERS: Dict[str, Callable[[bytes], object]] = {
    "round": RoundAnnouncement.from_json,
    "status": Status.from_json,
    "metrics": Metrics.from_json,
    "newer_protocol": newer_protocol,
}
SEEDS = {"round": json.loads(ROUND.to_json()), "status": json.loads(STATUS.to_json()),
         "metrics": json.loads(METRICS.to_json()), "newer_protocol": json.loads(ROUND.to_json())}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_fuzz_json_parsers_reject_never_crash(name):
    parse, seen = PARSERS[name], set()

    @FUZZ
    @given(json_messages_of(SEEDS[name]))
    def run(payload: bytes) -> None:
        seen.add(outcome(parse, payload))

    run()
    for payload in ADVERSARIAL:
        seen.add(outcome(parse, payload))
    assert "rejected" in seen or name == "newer_protocol"


def _header_mutations() -> st.SearchStrategy[bytes]:
    blob = good_update()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    first = M.trainable[0].name
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=300))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6),
                                                                                              inner, max_size=3),
                          max_leaves=8)

    def edit(args) -> bytes:
        where, key, value = args
        h = json.loads(json.dumps(header))
        if where == 0:
            h["__metadata__"][key] = value
        elif where == 1:
            h[first][key] = value
        else:
            h[key] = value
        text = json.dumps(h, allow_nan=True).encode()
        return struct.pack("<Q", len(text)) + text + data

    keys = st.sampled_from(["num_samples", "round", "dtype", "kind", "client_id", "shape", "data_offsets",
                            "__metadata__", first, "format"])
    flips = st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)).map(
        lambda p: blob[:p[0]] + bytes([p[1]]) + blob[p[0] + 1:])
    return st.one_of(st.tuples(st.integers(0, 2), keys, values).map(edit), flips,
                     st.binary(max_size=300).map(lambda b: header_blob(b, data)),
                     st.sampled_from(adversarial_headers()))


def test_fuzz_update_validation_rejects_never_crashes():
    seen = set()
    view = RoundView(3, {"c1"}, set())

    @FUZZ
    @given(_header_mutations())
    def run(blob: bytes) -> None:
        seen.add(outcome(lambda b: validate_update(b, "c1", M, view, LIMIT), blob, (Rejected,)))
        seen.add(outcome(lambda b: adapter.decode(b, M.trainable, model_id=M.model_id, max_bytes=LIMIT), blob,
                         (adapter.AdapterError,)))

    run()
    assert seen == {"ok", "rejected"}
    accepted = validate_update(good_update(), "c1", M, view, LIMIT)
    assert all(np.isfinite(np.asarray(t)).all() for t in accepted.tensors.values())


def test_message_bounds_are_declared():
    for message in (ROUND_MESSAGE, STATUS_MESSAGE, METRICS_MESSAGE):
        assert message.max_bytes <= 8 << 20 and message.max_depth <= wire.MAX_DEPTH
