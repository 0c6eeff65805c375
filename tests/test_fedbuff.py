"""FedBuff as a pure state machine (fake clock, no MQTT): staleness functions, admission, rebasing onto the
current global, the bounded window of globals, buffer closing, and a restart that resumes exactly."""

from __future__ import annotations

import json
import math
from typing import List, Sequence, Tuple

import numpy as np
import pytest

from flora.broker.fedbuff import CLOSE, WAIT, BufferConfig, BufferRecord, FedBuff, GlobalWindow, Staleness
from flora.broker.strategies import FedAvg
from flora.broker.validation import Rejected
from flora.edge.adapter import FlatTensors, layout_of
from flora.edge.synthetic import synthetic_manifest


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


SPECS = tuple(synthetic_manifest(blocks=2, width=8, rank=2).trainable)
LAYOUT = layout_of(SPECS)


def flat(seed: int, scale: float = 0.1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(LAYOUT.numel) * scale).astype(np.float32)


# --- staleness functions ------------------------------------------------------------------------------


def test_staleness_functions_have_their_published_values():
    sqrt, const, hinge = Staleness.parse("sqrt"), Staleness.parse("constant"), Staleness.parse("hinge:0.5,2")
    assert [sqrt(s) for s in (0, 1, 4, 9)] == [1.0, 0.5, 1 / 3, 0.25]
    assert [const(s) for s in (0, 3, 100)] == [1.0, 1.0, 1.0]
    assert [hinge(s) for s in (0, 2, 3, 6)] == [1.0, 1.0, 1 / 1.5, 1 / 3.0]  # 1/(1 + 0.5 (s - 2)) past s = 2
    assert hinge.describe == "hinge:0.5,2" and sqrt.describe == "sqrt"
    for bad in ("cubic", "sqrt:1", "hinge", "hinge:1", "hinge:a,b", "hinge:-1,2", "hinge:inf,1", "hinge:1,2,3"):
        with pytest.raises(ValueError):
            Staleness.parse(bad)
    with pytest.raises(ValueError):
        sqrt(-1)


def test_buffer_config_refuses_nonsense():
    for bad in (dict(buffer=0), dict(max_staleness=-1), dict(server_lr=0.0), dict(server_lr=math.nan),
                dict(min_updates=0)):
        with pytest.raises(ValueError):
            BufferConfig(**bad)


# --- the window of globals -------------------------------------------------------------------------------


def test_window_keeps_the_last_s_plus_one_globals_and_no_more():
    w = GlobalWindow(3)
    for v in range(10):
        w.add(v, flat(v))
    assert w.versions == [7, 8, 9] and w.latest == 9
    assert w.nbytes == 3 * LAYOUT.numel * 4  # bounded: (S + 1) adapters, however many versions went by
    np.testing.assert_array_equal(w.get(8), flat(8))
    with pytest.raises(KeyError):
        w.get(6)
    with pytest.raises(ValueError):
        w.add(9, flat(0))  # versions only go forward
    held = w.get(9)
    with pytest.raises(ValueError):
        held[0] = 1.0  # read-only: nothing outside can change a base


# --- admission -----------------------------------------------------------------------------------------------


def machine(k: int = 3, s: int = 2, staleness: str = "sqrt", lr: float = 1.0, quorum: int = 1,
            clock: FakeClock = None) -> FedBuff:
    fb = FedBuff(BufferConfig(k, s, Staleness.parse(staleness), lr, quorum), 60.0, clock or FakeClock())
    fb.start(0, flat(1000))
    return fb


def reason(fb: FedBuff, client: str, base: int) -> str:
    with pytest.raises(Rejected) as info:
        fb.admit(client, base)
    return info.value.reason


def test_admission_rejects_stale_early_and_duplicate_pairs():
    fb = machine(s=2)
    rec = fb.open()
    assert fb.admit("a", 0) == 1.0
    fb.accept(rec, "a", 0, 10, 1.0, 100)
    assert reason(fb, "a", 0) == "duplicate"  # at most one update per (client, base version)
    assert reason(fb, "a", 1) == "early"
    for v in range(1, 4):
        fb.advance(flat(1000 + v))
    assert fb.version == 3 and fb.oldest_base == 1
    assert reason(fb, "b", 0) == "stale"  # 3 versions old, S = 2
    assert fb.admit("b", 1) == pytest.approx(1 / (1 + math.sqrt(2)))
    assert fb.admit("a", 3) == 1.0  # a newer base is a new pair
    assert 0 not in fb.seen  # the accepted pairs of bases out of the window are forgotten (bounded)


def test_s_zero_accepts_only_the_current_version():
    fb = machine(s=0)
    fb.advance(flat(1))
    assert fb.admit("a", 1) == 1.0
    assert reason(fb, "a", 0) == "stale"
    assert fb.window.versions == [1]


# --- the fold ------------------------------------------------------------------------------------------------


Event = Tuple[str, int, int, np.ndarray]  # client, base, num_samples, flat update


def run(fb: FedBuff, events: Sequence[Event], strategy: FedAvg = None) -> List[np.ndarray]:
    """Feed events in order through FedBuff + FedAvg; the globals published (one per full buffer)."""
    strategy = strategy or FedAvg()
    published = []
    strategy.begin_round(SPECS, {})
    rec = fb.open()
    for client, base, n, update in events:
        weight = fb.admit(client, base)
        strategy.accumulate(FlatTensors(fb.rebase(update, base, weight), LAYOUT), n)
        fb.accept(rec, client, base, n, weight, update.nbytes)
        if fb.step(rec) == CLOSE:
            new = fb.next_global(np.concatenate([v.ravel() for v in strategy.finalize().values()]))
            fb.advance(new)
            published.append(new)
            strategy.begin_round(SPECS, {})
            rec = fb.open()
    return published


def test_k_equal_to_the_clients_fresh_and_eta_one_is_exactly_sync_fedavg():
    fb = machine(k=4, staleness="sqrt")
    ups = [(f"c{i}", 0, 10 + 7 * i, flat(i)) for i in range(4)]
    (published,) = run(fb, ups)
    sync = FedAvg()
    sync.begin_round(SPECS, {})
    for _, _, n, u in ups:
        sync.accumulate(FlatTensors(u, LAYOUT), n)
    expected = np.concatenate([v.ravel() for v in sync.finalize().values()])
    np.testing.assert_array_equal(published, expected)  # bit for bit: a fresh update is rebased to itself


def test_stale_updates_are_scaled_deltas_from_their_own_base_and_eta_scales_the_step():
    fb = machine(k=2, s=3, staleness="hinge:1,0", lr=0.5)
    g0 = fb.window.get(0).astype(np.float64)
    first = run(fb, [("a", 0, 3, flat(1)), ("b", 0, 1, flat(2))])
    g1 = g0 + 0.5 * ((3 * flat(1) + 1 * flat(2)) / 4 - g0)
    np.testing.assert_allclose(first[0], g1, atol=1e-7)
    # version 1: a stale update from base 0 (s = 1, weight 1/2) and a fresh one from base 1
    fb2_events = [("c", 0, 2, flat(3)), ("a", 1, 2, flat(4))]
    strategy = FedAvg()
    second = run(fb, fb2_events, strategy)
    g1 = first[0].astype(np.float64)
    step = (2 * 0.5 * (flat(3) - g0) + 2 * 1.0 * (flat(4) - g1)) / 4
    np.testing.assert_allclose(second[0], g1 + 0.5 * step, atol=1e-7)
    assert strategy.total_samples == 0  # a fresh buffer was begun after the close


def test_a_stale_update_moves_the_global_less_than_the_same_fresh_one():
    target = flat(7)
    steps = []
    for staleness in ("constant", "sqrt"):
        fb = machine(k=1, s=5, staleness=staleness)
        for _ in range(4):
            fb.advance(np.zeros(LAYOUT.numel, np.float32))
        (new,) = run(fb, [("a", 0, 1, target)])  # 4 versions old; the current global is zero: new = w * delta
        steps.append(float(np.abs(new).sum()))
    assert steps[1] == pytest.approx(steps[0] / 3, rel=1e-6)  # sqrt: w(4) = 1/3


# --- the buffer's clock -----------------------------------------------------------------------------------------


def test_the_buffer_closes_at_k_or_at_the_deadline_with_its_quorum():
    clock = FakeClock()
    fb = machine(k=3, quorum=2, clock=clock)
    rec = fb.open()
    assert rec.deadline == clock.t + 60.0
    fb.accept(rec, "a", 0, 1, 1.0, 10)
    clock.t += 61
    assert fb.step(rec) == WAIT and fb.overdue(rec)  # below the quorum: the deadline moves
    assert rec.deadline == clock.t + 60.0 and not fb.overdue(rec)
    fb.accept(rec, "b", 0, 1, 1.0, 10)
    assert fb.step(rec) == WAIT
    clock.t += 60
    assert fb.step(rec) == CLOSE  # quorum at the deadline
    fb.accept(rec, "c", 0, 1, 1.0, 10)
    clock.t -= 100
    assert fb.step(rec) == CLOSE  # K
    assert rec.count == 3 and rec.samples == 3 and rec.bytes_received == 30


# --- restart ----------------------------------------------------------------------------------------------------


def test_a_restart_mid_buffer_resumes_exactly_and_counts_nothing_twice():
    events = [("a", 0, 5, flat(1)), ("b", 0, 3, flat(2)), ("c", 0, 4, flat(3)),  # closes version 0 (K = 3)
              ("d", 0, 2, flat(4)), ("a", 1, 6, flat(5))]  # the open buffer of version 1 at the "crash"
    rest = [("e", 1, 1, flat(6))]
    whole = run(machine(k=3, s=2), events + rest)

    before = machine(k=3, s=2)
    published = run(before, events)
    # what the I/O side keeps: each version's global, the accepted pairs at commit, the open buffer's updates
    globals_on_disk = [(v, before.window.get(v)) for v in before.window.versions]
    seen_at_commit = json.loads(json.dumps({"0": ["a", "b", "c"]}))
    spool = events[3:]

    after = FedBuff(before.cfg, 60.0, FakeClock())
    after.start(globals_on_disk[-1][0], globals_on_disk[-1][1], globals_on_disk[:-1])
    strategy = FedAvg()
    strategy.begin_round(SPECS, {})
    rec = after.resume(after.open(seen_at_commit))
    for client, base, n, u in spool:  # re-folded in arrival order
        w = after.admit(client, base)
        strategy.accumulate(FlatTensors(after.rebase(u, base, w), LAYOUT), n)
        after.accept(rec, client, base, n, w, u.nbytes)
    assert reason(after, "b", 0) == "duplicate"  # accepted before the restart, in the committed version
    assert reason(after, "d", 0) == "duplicate"  # accepted into the open buffer before the restart
    restored = BufferRecord.from_json(json.loads(json.dumps(rec.to_json())))
    assert restored.accepted == rec.accepted and restored.count == 2
    client, base, n, u = rest[0]
    w = after.admit(client, base)
    strategy.accumulate(FlatTensors(after.rebase(u, base, w), LAYOUT), n)
    after.accept(rec, client, base, n, w, u.nbytes)
    assert after.step(rec) == CLOSE
    resumed = after.next_global(np.concatenate([v.ravel() for v in strategy.finalize().values()]))
    assert len(published) == 1 and len(whole) == 2
    np.testing.assert_array_equal(resumed, whole[1])  # the same bits as the run without a restart
