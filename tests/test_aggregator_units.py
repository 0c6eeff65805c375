"""The aggregator's parts without MQTT: FedAvg, update validation, the round clock, the checkpoint."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from broker.checkpoint import Checkpoint, CheckpointError
from broker.rounds import RoundClock, Sampling
from broker.strategies import FedAvg, make_strategy
from broker.validation import REASONS, Rejected, validate_update
from edge import adapter

from .factories import random_adapter, synthetic_manifest


def test_fedavg_weights_by_sample_count():
    m = synthetic_manifest()
    ups = [random_adapter(m, seed=i) for i in range(3)]
    weights = [10, 30, 60]
    s = FedAvg()
    s.begin(m.trainable, ups[0])
    for u, w in zip(ups, weights):
        s.accumulate(u, w)
    out = s.finalize()
    for name in ups[0]:
        expected = (10 * ups[0][name] + 30 * ups[1][name] + 60 * ups[2][name]) / 100
        assert out[name].dtype == np.float32
        np.testing.assert_allclose(out[name], expected, rtol=0, atol=1e-6)
    assert s.count == 3 and s.total_samples == 100


def test_streaming_average_equals_direct_numpy_average_and_memory_does_not_grow():
    m = synthetic_manifest(blocks=4)
    rng = np.random.default_rng(0)

    def run(n):
        s = make_strategy("fedavg")
        s.begin(m.trainable, {})
        direct = {t.name: np.zeros(t.shape) for t in m.trainable}
        weights = rng.integers(1, 500, n)
        tracemalloc.start()
        for i, w in enumerate(weights):
            u = random_adapter(m, seed=1000 + i, dtype=np.float16 if i % 2 else np.float32)
            s.accumulate(u, int(w))
            for k in direct:
                direct[k] += w * u[k].astype(np.float64)
            del u
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out = s.finalize()
        for k in direct:
            np.testing.assert_allclose(out[k], direct[k] / weights.sum(), rtol=0, atol=1e-6)
        return peak

    small, large = run(5), run(200)
    assert large < 1.5 * small + 256 * 1024  # the running sum is all the strategy keeps


def test_no_updates_means_no_new_global():
    s = FedAvg()
    s.begin(synthetic_manifest().trainable, {})
    assert s.finalize() is None
    with pytest.raises(ValueError):
        s.accumulate({}, 0)
    with pytest.raises(ValueError, match="unknown aggregation strategy 'median'"):
        make_strategy("median")


# --- validation: every rejection reason ----------------------------------------------------------


def _update(m, client="c1", rnd=3, n=10, model_id=None, tensors=None, dtype="float32"):
    return adapter.encode(tensors if tensors is not None else random_adapter(m, 1), model_id=model_id or m.model_id,
                          round=rnd, kind="update", client_id=client, num_samples=n, dtype=dtype)


def _check(m, blob, client="c1", asked=("c1", "c2"), already=(), max_bytes=None):
    return validate_update(blob, client, m, current_round=3, asked=set(asked), already=set(already),
                           max_bytes=max_bytes or adapter.max_blob_bytes(m.trainable))


def test_a_good_update_passes_in_fp32_and_fp16():
    m = synthetic_manifest()
    assert _check(m, _update(m)).meta.num_samples == 10
    assert _check(m, _update(m, dtype="float16")).meta.dtype == "float16"


def _bad_updates(m):
    good = random_adapter(m, 1)
    wrong_shape = dict(good)
    first = m.trainable[0].name
    wrong_shape[first] = np.zeros((3, 3), np.float32)
    nan = {k: v.copy() for k, v in good.items()}
    nan[first][0, 0] = np.inf
    zero_samples = bytearray(_update(m, n=1))
    zero_samples = bytes(zero_samples).replace(b'"num_samples":"1"', b'"num_samples":"0"')
    huge = dict(good, padding=np.zeros(adapter.max_blob_bytes(m.trainable) // 4, np.float32))
    return {
        "oversized": (_update(m, tensors=huge), "c1", ()),
        "malformed": (b"this is not a safetensors blob at all", "c1", ()),
        "client-mismatch": (_update(m, client="c2"), "c1", ()),
        "foreign-model": (_update(m, model_id="e" * 64), "c1", ()),
        "late": (_update(m, rnd=2), "c1", ()),
        "early": (_update(m, rnd=4), "c1", ()),
        "not-asked": (_update(m, client="c9"), "c9", ()),
        "duplicate": (_update(m), "c1", ("c1",)),
        "bad-tensors": (_update(m, tensors=wrong_shape), "c1", ()),
        "bad-num-samples": (zero_samples, "c1", ()),
        "non-finite": (_update(m, tensors=nan), "c1", ()),
    }


def test_every_rejection_reason_is_detected():
    m = synthetic_manifest()
    cases = _bad_updates(m)
    assert set(cases) == set(REASONS)
    for reason, (blob, client, already) in cases.items():
        with pytest.raises(Rejected) as err:
            _check(m, blob, client=client, already=already)
        assert err.value.reason == reason, (reason, err.value)


# --- the round clock ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_round_closes_when_all_asked_reported_even_before_the_deadline():
    clock = FakeClock()
    rc = RoundClock(min_clients=2, timeout_s=60, clock=clock)
    rec = rc.open(0, ["a", "b", "c"])
    rec.accept("a", 5, 100)
    rec.accept("b", 5, 100)
    assert not rc.should_close(rec)  # quorum, but neither complete nor due
    rec.accept("c", 5, 100)
    assert rc.should_close(rec) and not rc.due(rec)


def test_at_the_deadline_a_quorum_closes_and_less_extends_keeping_updates():
    clock = FakeClock()
    rc = RoundClock(min_clients=2, timeout_s=60, clock=clock)
    sampling = Sampling(clients_per_round=2, min_clients=2, seed=1)
    rec = rc.open(0, ["a", "b"])
    rec.accept("a", 5, 100)
    clock.t += 61
    assert rc.due(rec) and not rc.quorum(rec) and not rc.should_close(rec)
    added = rc.extend(rec, online={"a", "c", "d"}, sampling=sampling)  # b went offline: ask one more
    assert len(added) == 1 and added[0] in {"c", "d"}
    assert rec.deadline == clock.t + 60 and rec.extensions == 1 and rec.reported == {"a": 5}
    assert rc.extend(rec, online={"a", "b", "c", "d"}, sampling=sampling) == []  # reachable: enough asked
    clock.t += 61
    rec.accept(added[0], 7, 100)
    assert rc.should_close(rec)


def test_sampling_is_seeded_and_respects_the_quorum():
    online = [f"c{i}" for i in range(10)]
    s = Sampling(clients_per_round=3, min_clients=2, seed=7)
    assert s.choose(online, 4) == s.choose(reversed(online), 4)
    assert s.choose(online, 4) != s.choose(online, 5)
    assert len(Sampling(fraction=0.1, min_clients=3).choose(online, 0)) == 3
    assert Sampling().choose(online, 0) == sorted(online)
    with pytest.raises(ValueError):
        Sampling(clients_per_round=2, fraction=0.5)


# --- checkpoint and resume ------------------------------------------------------------------------


def _row(r):
    return {"round": r, "num_reported": 2}


def test_checkpoint_resumes_at_the_committed_round(tmp_path):
    cp = Checkpoint(tmp_path)
    assert cp.load() is None
    state = cp.start("m" * 64, 3, b"global-0")
    cp.spool(0, "c1", b"update-c1")
    assert cp.spooled(0) == [("c1", b"update-c1")]
    cp.commit(state, 1, b"global-1", _row(0), done=False)
    assert cp.spooled(0) == []
    loaded, blob = Checkpoint(tmp_path).load()
    assert loaded.round == 1 and blob == b"global-1" and not loaded.done
    assert [r["round"] for r in cp.history()] == [0]
    assert sorted(p.name for p in tmp_path.glob("global-*")) == ["global-000001.safetensors"]


def test_a_crash_between_state_and_history_is_repaired(tmp_path):
    cp = Checkpoint(tmp_path)
    state = cp.start("m" * 64, 3, b"g0")
    cp.commit(state, 1, b"g1", _row(0), done=False)
    # simulate a crash after state.json switched to round 2 but before the history row was appended
    state.last_row = _row(1)
    state.round = 2
    (tmp_path / "global-000002.safetensors").write_bytes(b"g2")
    from edge.fileio import sha256_bytes

    state.global_file, state.global_sha256 = "global-000002.safetensors", sha256_bytes(b"g2")
    cp.save(state)
    with open(tmp_path / "history.jsonl", "a") as fh:
        fh.write('{"round": 1, "torn')  # and a torn partial line
    loaded, blob = Checkpoint(tmp_path).load()
    assert loaded.round == 2 and blob == b"g2"
    assert [r["round"] for r in cp.history()] == [0, 1]
    Checkpoint(tmp_path).load()
    assert [r["round"] for r in cp.history()] == [0, 1]  # repaired once, not again


def test_a_corrupt_checkpointed_global_is_refused(tmp_path):
    cp = Checkpoint(tmp_path)
    cp.start("m" * 64, 3, b"g0")
    (tmp_path / "global-000000.safetensors").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        cp.load()
    (tmp_path / "state.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CheckpointError):
        cp.load()
