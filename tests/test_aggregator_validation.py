"""Update validation: every rejection reason, zero-copy decoding, and garbage that must never crash it."""

from __future__ import annotations

import json
import struct
from typing import Callable, Dict

import numpy as np
import pytest
from safetensors.numpy import load as safetensors_load

from flora.broker.fedbuff import BufferConfig, FedBuff
from flora.broker.strategies import FedAvg
from flora.broker.validation import (
    BAD_CLIENT_ID,
    DEFAULT_MAX_NUM_SAMPLES,
    NO_ROUND,
    RATE_LIMITED,
    REASONS,
    STRATEGY_FULL,
    VALIDATION_REASONS,
    Rejected,
    RoundView,
    validate_update,
)
from flora.edge import adapter
from flora.edge.synthetic import encode_update, random_adapter, synthetic_manifest

M = synthetic_manifest()
LIMIT = adapter.max_blob_bytes(M.trainable)
ROUND = RoundView(3, asked={"c1", "c2"}, reported={"c2"})


def _async_view() -> RoundView:
    """Version 3 of an async federation that accepts bases 1..3 (--max-staleness 2)."""
    fb = FedBuff(BufferConfig(buffer=4, max_staleness=2), 60.0)
    fb.start(0, np.zeros(sum(t.numel for t in M.trainable), np.float32))
    for _ in range(3):
        fb.advance(np.zeros(sum(t.numel for t in M.trainable), np.float32))
    return RoundView(fb.version, None, set(), admit=fb.admit)


ASYNC = _async_view()


def update(client: str = "c1", rnd: int = 3, n: int = 10, seed: int = 1, **kw) -> bytes:
    tensors = kw.pop("tensors", None)
    return encode_update(M, tensors if tensors is not None else random_adapter(M, seed), client, rnd, n, **kw)


def rewrite_header(blob: bytes, edit: Callable[[Dict], None]) -> bytes:
    """The same data section under an edited header (as a forger would write it)."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


def check(blob: bytes, client: str = "c1", round_: RoundView = ROUND, max_bytes: int = LIMIT) -> adapter.Adapter:
    return validate_update(blob, client, M, round_, max_bytes)


def test_good_updates_pass_in_fp32_and_fp16_as_zero_copy_read_only_views():
    for dtype in ("float32", "float16"):
        blob = update(dtype=dtype)
        got = check(blob)
        assert got.meta.num_samples == 10 and got.meta.dtype == dtype and got.meta.client_id == "c1"
        expected = safetensors_load(blob)
        assert list(got.tensors) != [] and set(got.tensors) == set(expected)
        for name, arr in got.tensors.items():
            np.testing.assert_array_equal(arr, expected[name])
            assert arr.dtype == np.dtype(dtype) and not arr.flags.writeable
            assert np.shares_memory(arr, np.frombuffer(blob, np.uint8))


def _reordered(blob: bytes) -> bytes:
    """The same tensors in another valid layout (reverse name order), as another safetensors writer may
    lay them out."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    new_header, chunks, position = {"__metadata__": header.pop("__metadata__")}, [], 0
    for name in sorted(header, reverse=True):
        begin, end = header[name]["data_offsets"]
        chunks.append(data[begin:end])
        new_header[name] = dict(header[name], data_offsets=[position, position + end - begin])
        position += end - begin
    text = json.dumps(new_header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def test_agents_blobs_are_one_flat_view_and_other_layouts_are_read_tensor_by_tensor():
    blob = update(seed=4)
    flat = check(blob)
    assert isinstance(flat.tensors, adapter.FlatTensors)
    assert np.shares_memory(flat.tensors.flat, np.frombuffer(blob, np.uint8))
    other = check(_reordered(update(seed=5)))
    assert not isinstance(other.tensors, adapter.FlatTensors)
    np.testing.assert_array_equal(check(_reordered(blob)).tensors[M.trainable[0].name],
                                  flat.tensors[M.trainable[0].name])
    fedavg = FedAvg()  # folds both kinds into the same float64 sums
    fedavg.begin_round(M.trainable, {})
    fedavg.accumulate(flat.tensors, 3)
    fedavg.accumulate(other.tensors, 1)
    out = fedavg.finalize()
    a, b = random_adapter(M, 4), random_adapter(M, 5)
    for name in a:
        np.testing.assert_allclose(out[name], (3 * a[name].astype(np.float64) + b[name]) / 4, rtol=0, atol=1e-7)


def _forged_meta(**changes: str) -> bytes:
    def edit(h: Dict) -> None:
        for key, value in changes.items():
            if value is None:
                h["__metadata__"].pop(key)
            else:
                h["__metadata__"][key] = value
    return rewrite_header(update(), edit)


def _bad_offsets() -> bytes:
    def edit(h: Dict) -> None:
        first = M.trainable[0].name
        begin, end = h[first]["data_offsets"]
        h[first]["data_offsets"] = [begin + 4, end + 4]  # overlaps its neighbour
    return rewrite_header(update(), edit)


def _transposed() -> bytes:  # same byte count, wrong shape
    def edit(h: Dict) -> None:
        h[M.trainable[0].name]["shape"] = list(reversed(h[M.trainable[0].name]["shape"]))
    return rewrite_header(update(), edit)


def _mixed_dtype() -> bytes:  # float16 tensors in a blob whose metadata says float32
    return rewrite_header(update(dtype="float16"), lambda h: h["__metadata__"].update(dtype="float32"))


def _with_nan(value: float) -> bytes:
    t = random_adapter(M, 1)
    t[M.trainable[-1].name][1, 2] = value
    return update(tensors=t)


def cases() -> Dict[str, list]:
    """reason -> [(blob, topic client, round view)]: at least one forged update per reason."""
    good = random_adapter(M, 1)
    wrong_shape = dict(good)
    wrong_shape[M.trainable[0].name] = np.zeros((3, 3), np.float32)
    missing = dict(good)
    missing.pop(M.trainable[1].name)
    extra = dict(good, **{"text.resblocks.9.attn.q.lora_A": np.zeros((4, 16), np.float32)})
    padding = dict(good, padding=np.zeros(LIMIT // 4, np.float32))
    return {
        "oversized": [update(tensors=padding)],
        "malformed": [b"this is not a safetensors blob at all", b"", b"\xff" * 8 + b"{}",
                      struct.pack("<Q", 2) + b"[]", rewrite_header(update(), lambda h: h.update(x={"dtype": "F32"})),
                      rewrite_header(update(), lambda h: h[M.trainable[0].name].update(shape="4x16")),
                      update()[:-4],  # truncated data
                      update() + b"\0" * 8,  # trailing bytes
                      _bad_offsets(),
                      _forged_meta(kind="global"), _forged_meta(format="other"), _forged_meta(client_id=None),
                      adapter.encode(good, model_id=M.model_id, round=3, kind="global"),
                      # a metadata value longer than the header schema's 512 characters: a 5,000-digit
                      # num_samples is malformed, never parsed as a number
                      _forged_meta(num_samples="9" * 5000), _forged_meta(num_samples="1" * 513),
                      _forged_meta(round="1" + "0" * 600), _forged_meta(round="+3"), _forged_meta(round="03")],
        "bad-dtype": [_forged_meta(dtype="float64"), _forged_meta(dtype="int8"), _mixed_dtype()],
        "bad-num-samples": [_forged_meta(num_samples="0"), _forged_meta(num_samples="-4"),
                            _forged_meta(num_samples="many"), _forged_meta(num_samples=None),
                            # implausible: a float64 weighted sum would overflow, or float() would raise
                            update(n=DEFAULT_MAX_NUM_SAMPLES + 1), update(n=10 ** 308), update(n=10 ** 400),
                            _forged_meta(num_samples="9" * 512),
                            # not the canonical decimal an agent writes (int() would accept each of these)
                            _forged_meta(num_samples="+5"), _forged_meta(num_samples=" 5"),
                            _forged_meta(num_samples="1_000"), _forged_meta(num_samples="05")],
        "client-mismatch": [update(client="c2")],
        "foreign-model": [update(model_id="e" * 64)],
        "late": [update(rnd=2), update(rnd=0)],
        "stale": [(update(rnd=0), "c1", ASYNC)],  # async: a base version more than --max-staleness old
        "early": [update(rnd=4)],
        "not-asked": [(update(client="c9"), "c9")],
        "duplicate": [(update(client="c2"), "c2")],
        "bad-tensors": [update(tensors=wrong_shape), update(tensors=missing), update(tensors=extra), _transposed()],
        "non-finite": [_with_nan(np.nan), _with_nan(np.inf), _with_nan(-np.inf),
                       update(tensors=dict({k: v.astype(np.float16) for k, v in good.items()},
                                           **{M.trainable[0].name: np.full((4, 16), np.inf, np.float16)}),
                              dtype="float16")],
    }


def test_every_rejection_reason_is_detected_with_a_readable_detail():
    all_cases = cases()
    assert set(all_cases) == set(VALIDATION_REASONS)
    assert set(REASONS) == {*VALIDATION_REASONS, NO_ROUND, BAD_CLIENT_ID, STRATEGY_FULL, RATE_LIMITED}
    for reason, blobs in all_cases.items():
        for i, item in enumerate(blobs):
            blob, client, view = (*item, ROUND)[:3] if isinstance(item, tuple) else (item, "c1", ROUND)
            with pytest.raises(Rejected) as err:
                check(blob, client=client, round_=view)
            assert err.value.reason == reason, (reason, i, str(err.value))
            assert str(err.value).startswith(f"{reason}: ") and len(err.value.detail) > 5
            assert len(err.value.detail) < 400, (reason, i)  # a forged header never floods the log or the record


def test_the_num_samples_cap_is_inclusive_and_configurable():
    assert check(update(n=DEFAULT_MAX_NUM_SAMPLES)).meta.num_samples == DEFAULT_MAX_NUM_SAMPLES
    assert validate_update(update(n=100), "c1", M, ROUND, LIMIT, max_num_samples=100).meta.num_samples == 100
    with pytest.raises(Rejected, match=r"^bad-num-samples: num_samples='101' is above the cap of 100"):
        validate_update(update(n=101), "c1", M, ROUND, LIMIT, max_num_samples=100)
    with pytest.raises(Rejected, match=r"above the cap of 1000000000 \(--max-num-samples\)") as err:
        check(update(n=10 ** 400))
    assert err.value.detail.startswith("num_samples='1" + "0" * 30 + "…(403 chars) is above")  # not 401 digits


def test_cheap_checks_come_first():
    # a late update is rejected as late before its (broken) tensors are looked at
    t = random_adapter(M, 1)
    t[M.trainable[0].name][0, 0] = np.nan
    with pytest.raises(Rejected, match=r"^late"):
        check(update(rnd=1, tensors=t))
    with pytest.raises(Rejected, match=r"^oversized"):
        check(update(rnd=1), max_bytes=100)
    # any client may report when the round asks "all"
    assert check(update(client="c9"), client="c9", round_=RoundView(3, None, set())).meta.client_id == "c9"


def test_random_corruption_is_rejected_or_accepted_never_a_crash():
    good = update(seed=5)
    rng = np.random.default_rng(0)
    header_len = struct.unpack("<Q", good[:8])[0]
    outcomes = set()
    for _ in range(400):
        blob = bytearray(good)
        for pos in rng.integers(0, 8 + header_len + 64, size=rng.integers(1, 4)):
            blob[pos] = rng.integers(0, 256)
        if rng.random() < 0.2:
            blob = blob[: rng.integers(0, len(blob))]
        try:
            got = check(bytes(blob))
        except Rejected as exc:
            outcomes.add(exc.reason)
        else:
            outcomes.add("accepted")
            assert all(np.isfinite(a).all() for a in got.tensors.values())
    assert "malformed" in outcomes and len(outcomes) >= 2


def test_decode_agrees_with_safetensors_and_copies_by_default():
    blob = adapter.encode(random_adapter(M, 3), model_id=M.model_id, round=1, kind="global", dtype="float16")
    ours = adapter.decode(blob, M.trainable, model_id=M.model_id)
    theirs = safetensors_load(blob)
    assert ours.meta.round == 1 and set(ours.tensors) == set(theirs)
    for name, arr in ours.tensors.items():
        np.testing.assert_array_equal(arr, theirs[name])
        assert arr.flags.writeable and not np.shares_memory(arr, np.frombuffer(blob, np.uint8))
    views = adapter.decode(blob, copy=False)
    assert all(not v.flags.writeable for v in views.tensors.values())
    with pytest.raises(adapter.AdapterError, match="holds NaN"):
        adapter.decode(_with_nan(np.nan))
    with pytest.raises(adapter.AdapterError, match="starts at byte"):
        adapter.decode(_bad_offsets())
