"""One device must not capture or brick the model: the influence bounds (broker/influence.py) at the aggregator's
round close, the rollback of a global whose held-out evaluation is not finite, and a poisoned federation on
scikit-learn's digits that ends where the honest one does."""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np
import pytest
from sklearn.datasets import load_digits

from flora.broker.checkpoint import Checkpoint
from flora.broker.cli import main as aggregator_main
from flora.broker.influence import NORM_OUTLIER, OVER_DECLARED, InfluencePolicy
from flora.broker.rounds import Sampling
from flora.edge import adapter
from flora.edge.protocol import Status
from flora.edge.synthetic import encode_update, random_adapter

from .fakes import FakeClock, offline_aggregator


def _status(client: str, declared: Optional[int]) -> bytes:
    return Status(client, "online", num_samples=declared).to_json()


def _federation(tmp_path, clients, declared=None, **kw):
    agg = offline_aggregator(tmp_path, FakeClock(), rounds=kw.pop("rounds", 3), round_timeout_s=30,
                             sampling=Sampling(min_clients=1), **kw)
    agg._resume_or_start()
    for c in clients:
        agg.handle("status", c, _status(c, (declared or {}).get(c)))
    return agg


def _shifted(g: Dict[str, np.ndarray], by: float) -> Dict[str, np.ndarray]:
    return {k: (v + by).astype(np.float32) for k, v in g.items()}


def _row(tmp_path, n: int = -1):
    return Checkpoint(tmp_path).history()[n]


def test_an_update_above_the_devices_declared_num_samples_is_rejected_as_over_declared(tmp_path):
    agg = _federation(tmp_path, ["a", "b"], declared={"a": 50})
    m, g = agg.manifest, agg.global_tensors
    agg._open_round()
    agg.handle("update", "a", encode_update(m, _shifted(g, 0.01), "a", 0, 51))
    agg.handle("update", "b", encode_update(m, _shifted(g, 0.02), "b", 0, 10 ** 6))  # declared nothing: not checked
    rec = agg.current
    assert rec.rejection_counts == {OVER_DECLARED: 1} and set(rec.reported) == {"b"}
    assert "num_samples=51 is above the 50 the device declared" in rec.rejected[0]["detail"]
    agg._close_round()
    np.testing.assert_allclose(agg.global_tensors[next(iter(g))], _shifted(g, 0.02)[next(iter(g))], atol=1e-7)


def test_a_huge_weight_with_huge_values_is_refused_and_the_global_is_the_honest_fedavg(tmp_path):
    honest = {"a": 100, "b": 120, "c": 90}
    agg = _federation(tmp_path, [*honest, "evil"], declared={**honest, "evil": 10 ** 9})
    m, g = agg.manifest, agg.global_tensors
    agg._open_round()
    ups = {c: random_adapter(m, i + 1, scale=0.01) for i, c in enumerate(honest)}
    for c, w in honest.items():
        agg.handle("update", c, encode_update(m, {k: g[k] + ups[c][k] for k in g}, c, 0, w))
    agg.handle("update", "evil", encode_update(m, _shifted(g, 1e30), "evil", 0, 10 ** 9))
    assert set(agg.current.reported) == {*honest, "evil"}  # accepted as it came: bounded at the close
    agg._close_round()
    row = _row(tmp_path)
    assert not row.get("failed") and row["influence"]["refused"] == {"evil": NORM_OUTLIER}
    assert row["rejection_counts"] == {NORM_OUTLIER: 1} and set(row["reported"]) == set(honest)
    total = sum(honest.values())
    for k in g:  # exactly the float64 FedAvg of the three honest updates
        want = sum(w * (g[k].astype(np.float64) + ups[c][k]) for c, w in honest.items()) / total
        np.testing.assert_allclose(agg.global_tensors[k], want, rtol=0, atol=1e-6)
    assert agg.state.extra["influence"]["norm_medians"]  # kept for a later round of one update


def test_clip_scales_the_outlier_down_and_the_share_cap_halves_its_weight(tmp_path):
    agg = _federation(tmp_path, ["a", "b", "evil"], influence=InfluencePolicy(norm_action="clip"))
    m, g = agg.manifest, agg.global_tensors
    agg._open_round()
    d = {"a": 0.001, "b": 0.002, "evil": 1e3}  # a constant shift of every value: its norm is d * sqrt(numel)
    w = {"a": 10, "b": 30, "evil": 10 ** 9}
    for c in d:
        agg.handle("update", c, encode_update(m, _shifted(g, d[c]), c, 0, w[c]))
    agg._close_round()
    info = _row(tmp_path)["influence"]
    # evil's delta is clipped to 10 x the median of the others (0.0015), its weight capped at half: 40 of 80
    assert info["capped"] == {"evil": 40.0} and info["clipped"]["evil"] == pytest.approx(0.015 / 1e3, rel=1e-3)
    want = (10 * 0.001 + 30 * 0.002 + 40 * 0.015) / 80
    k = next(iter(g))
    np.testing.assert_allclose(agg.global_tensors[k] - g[k], want, rtol=1e-3)


def test_a_lone_outlier_after_honest_rounds_fails_its_round_and_the_federation_goes_on(tmp_path):
    agg = _federation(tmp_path, ["a", "b"], rounds=3)
    m = agg.manifest
    agg._open_round()
    for c, s in (("a", 0.001), ("b", 0.002)):
        agg.handle("update", c, encode_update(m, _shifted(agg.global_tensors, s), c, 0, 10))
    agg._close_round()
    before = dict(agg.global_tensors)
    agg._open_round()
    agg.handle("update", "a", encode_update(m, _shifted(before, 1e3), "a", 1, 10))  # the only update of round 1
    agg._close_round()
    row = _row(tmp_path)
    assert row["failed"] == "every update was refused by the influence bounds"
    assert row["influence"]["refused"] == {"a": NORM_OUTLIER}
    assert all(np.array_equal(agg.global_tensors[k], before[k]) for k in before) and agg.state.round == 2
    agg._open_round()  # round 2 trains from the unchanged global
    agg.handle("update", "b", encode_update(m, _shifted(before, 0.003), "b", 2, 10))
    agg._close_round()
    assert not _row(tmp_path).get("failed") and agg.state.done


def test_a_global_whose_held_out_evaluation_is_not_finite_is_rolled_back(tmp_path):
    def evaluate(rnd, tensors):
        return {"test_accuracy": 0.5, "test_loss": float("nan") if rnd == 1 else 0.7}

    agg = _federation(tmp_path, ["a"], rounds=3, on_round_closed=evaluate)
    m = agg.manifest
    blobs = []
    for r in range(3):
        agg._open_round()
        blob = encode_update(m, _shifted(agg.global_tensors, 0.001 * (r + 1)), "a", r, 10)
        blobs.append(blob)
        before = dict(agg.global_tensors)
        agg.handle("update", "a", blob)
        agg._close_round()
        if r == 1:  # rolled back: the round-1 global stays, the round is recorded failed with the evaluation
            assert all(np.array_equal(agg.global_tensors[k], before[k]) for k in before)
    rows = Checkpoint(tmp_path).history()
    assert [bool(r.get("failed")) for r in rows] == [False, True, False] and agg.state.done
    assert "held-out evaluation of the new global is not finite (test_loss = nan)" in rows[1]["failed"]
    assert rows[1]["test_loss"] is None and rows[1]["test_accuracy"] == 0.5  # strict JSON: NaN written as null
    final = adapter.decode(blobs[2]).as_float32()
    assert all(np.allclose(agg.global_tensors[k], final[k]) for k in final)


# --- a poisoned federation on digits ---------------------------------------------------------------------------

DEFAULTS = InfluencePolicy()  # the aggregator's defaults: 50 % share cap, norm bound 10 x the median, reject

def _digits(clients: int):
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    test = slice(0, 360)
    shards = np.array_split(np.arange(360, len(y)), clients)
    return (x[test], y[test]), [(x[s], y[s]) for s in shards]


class Softmax:
    """Softmax regression on the digits' 64 pixels, its weights held in the first 650 values of the adapter's
    flat layout (the aggregator averages whatever the tensors hold)."""

    def __init__(self, manifest) -> None:
        self.layout = adapter.layout_of(tuple(manifest.trainable))
        assert self.layout.numel >= 650

    def params(self, tensors):
        flat = np.zeros(self.layout.numel)
        for name, _, a, b in self.layout.entries:
            flat[a:b] = np.ravel(tensors[name])
        return flat

    def tensors(self, flat):
        return self.layout.split(flat.astype(np.float32))

    @staticmethod
    def logits(flat, x):
        return x @ flat[:640].reshape(64, 10) + flat[640:650]

    def train(self, tensors, x, y, steps: int = 10, lr: float = 1.0):
        flat = self.params(tensors)
        for _ in range(steps):
            z = self.logits(flat, x)
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(y)), y] -= 1
            flat[:640] -= lr * (x.T @ p / len(y)).ravel()
            flat[640:650] -= lr * p.mean(axis=0)
        return self.tensors(flat)

    def accuracy(self, tensors, x, y) -> float:
        with np.errstate(all="ignore"):
            return float(np.mean(np.argmax(self.logits(self.params(tensors), x), axis=1) == y))


def _run(tmp_path, poison: Optional[float], influence: Optional[InfluencePolicy] = DEFAULTS,
         rounds: int = 8) -> List[float]:
    """Test accuracy after each round of 4 honest clients (and, with `poison`, a fifth that sends every value
    as `poison` with num_samples 10^9, declared so in its status)."""
    (xt, yt), shards = _digits(4)
    honest = {f"c{i}": shard for i, shard in enumerate(shards)}
    declared = {c: len(s[1]) for c, s in honest.items()}
    clients = [*honest, *(["evil"] if poison is not None else [])]
    agg = offline_aggregator(tmp_path, FakeClock(), rounds=rounds, round_timeout_s=30, influence=influence)
    model = Softmax(agg.manifest)
    agg._resume_or_start()
    for c in clients:
        agg.handle("status", c, _status(c, declared.get(c, 10 ** 9)))
    accs = []
    for r in range(rounds):
        agg._open_round()
        g = agg.global_tensors
        for c, (x, y) in honest.items():
            agg.handle("update", c, encode_update(agg.manifest, model.train(g, x, y), c, r, len(y)))
        if poison is not None:
            evil = {k: np.full_like(v, poison) for k, v in g.items()}
            agg.handle("update", "evil", encode_update(agg.manifest, evil, "evil", r, 10 ** 9))
        agg._close_round()
        accs.append(model.accuracy(agg.global_tensors, xt, yt))
    assert agg.state.done
    return accs


@pytest.mark.parametrize("poison", [1e3, 1e30])
def test_a_poisoning_device_leaves_the_federation_within_two_points_of_the_honest_run(tmp_path, poison):
    honest = _run(tmp_path / "honest", None)
    assert honest[-1] > 0.85  # it learns
    poisoned = _run(tmp_path / "poisoned", poison)
    print(f"poison {poison:g}: honest {honest[-1]:.4f}, poisoned {poisoned[-1]:.4f}")
    assert abs(poisoned[-1] - honest[-1]) <= 0.02, (honest, poisoned)
    rows = Checkpoint(tmp_path / "poisoned").history()
    assert all(r["influence"]["refused"] == {"evil": NORM_OUTLIER} and not r.get("failed") for r in rows)
    unbounded = _run(tmp_path / "unbounded", poison, influence=None, rounds=2)  # what the bounds prevent
    print(f"poison {poison:g}: without the bounds {unbounded}")
    assert unbounded[-1] < 0.5 or not math.isfinite(unbounded[-1])


def test_the_options_are_documented_and_refused_where_they_cannot_apply(tmp_path, capsys):
    with pytest.raises(SystemExit):
        aggregator_main(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ("--max-client-share", "--norm-bound", "--norm-bound-action"):
        assert flag in text
    for extra in (["--secure-aggregation"], ["--mode", "async"]):
        code = aggregator_main(["run", "--manifest", str(tmp_path / "none.json"), "--state-dir", str(tmp_path / "s"),
                                "--broker", "mqtt://127.0.0.1:1", "--max-client-share", "0.3", *extra])
        assert code == 2
        assert "--max-client-share: not with" in capsys.readouterr().err


def test_an_update_accepted_before_a_restart_is_not_judged_again_against_an_older_device_list(tmp_path):
    agg = _federation(tmp_path, ["a", "b"], declared={"a": 10, "b": 10}, rounds=2)
    agg.watch.tick(agg.state, agg.current, force=True)  # devices.json holds the declared 10
    m, g = agg.manifest, agg.global_tensors
    agg.handle("status", "a", _status("a", 100))  # a newer declaration, not saved yet when the process dies
    agg._open_round()
    agg.handle("update", "a", encode_update(m, _shifted(g, 0.01), "a", 0, 100))
    assert set(agg.current.reported) == {"a"} and not agg.current.rejection_counts
    again = offline_aggregator(tmp_path, FakeClock(), rounds=2, round_timeout_s=30, sampling=Sampling(min_clients=1))
    again._resume_or_start()  # replays the journal: the accepted update stays accepted
    assert again.watch.devices.get("a").num_samples == 10
    assert set(again.current.reported) == {"a"} and not again.current.rejection_counts
