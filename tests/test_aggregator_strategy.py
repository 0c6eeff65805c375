"""FedAvg and the strategy registry: weighting, streaming accumulation, float64 sums, flat memory."""

from __future__ import annotations

import tracemalloc
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import pytest

from flora.broker.strategies import STRATEGIES, FedAvg, Strategy, make_strategy
from flora.edge.bundle import TensorSpec
from flora.edge.synthetic import random_adapter, synthetic_manifest


def test_fedavg_weights_each_tensor_by_sample_count():
    specs = [TensorSpec("t.lora_A", (1, 2)), TensorSpec("t.lora_B", (2, 1))]
    s = FedAvg()
    s.begin_round(specs, {})
    s.accumulate({"t.lora_A": np.array([[1.0, 0.0]], np.float32), "t.lora_B": np.array([[2.0], [4.0]], np.float32)}, 1)
    s.accumulate({"t.lora_A": np.array([[3.0, 8.0]], np.float32), "t.lora_B": np.array([[6.0], [0.0]], np.float32)}, 3)
    out = s.finalize()
    assert out is not None and s.count == 2 and s.total_samples == 4
    np.testing.assert_array_equal(out["t.lora_A"], [[2.5, 6.0]])  # (1*1 + 3*3)/4, (1*0 + 3*8)/4
    np.testing.assert_array_equal(out["t.lora_B"], [[5.0], [1.0]])
    assert all(v.dtype == np.float32 for v in out.values())


def test_a_and_b_are_averaged_separately_as_in_flora():
    m = synthetic_manifest(blocks=1, targets=("q",))
    a_name, b_name = (t.name for t in m.trainable)
    ups = [random_adapter(m, seed=i) for i in range(2)]
    s = make_strategy("fedavg")
    s.begin_round(m.trainable, ups[0])
    for u in ups:
        s.accumulate(u, 5)
    out = s.finalize()
    np.testing.assert_allclose(out[a_name], (ups[0][a_name] + ups[1][a_name]) / 2, atol=1e-7)
    np.testing.assert_allclose(out[b_name], (ups[0][b_name] + ups[1][b_name]) / 2, atol=1e-7)
    # the product of the averages is not the average of the products: FLORA averages the factors
    products = (ups[0][b_name] @ ups[0][a_name] + ups[1][b_name] @ ups[1][a_name]) / 2
    assert not np.allclose(out[b_name] @ out[a_name], products, atol=1e-4)


def test_streaming_average_equals_direct_numpy_average_and_memory_does_not_grow():
    m = synthetic_manifest(blocks=4, width=32)
    rng = np.random.default_rng(0)

    def run(n: int) -> int:
        s = FedAvg()
        s.begin_round(m.trainable, {})
        updates_seen = []
        weights = rng.integers(1, 500, n)
        tracemalloc.start()
        for i, w in enumerate(weights):
            u = random_adapter(m, seed=1000 + i, dtype=np.float16 if i % 2 else np.float32)
            for arr in u.values():
                arr.setflags(write=False)  # the aggregator hands in read-only views of the message
            s.accumulate(u, int(w))
            updates_seen.append(1000 + i)
            del u
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out = s.finalize()
        stacked = {k: np.stack([random_adapter(m, seed, np.float16 if j % 2 else np.float32)[k].astype(np.float64)
                                for j, seed in enumerate(updates_seen)]) for k in out}
        for k, arr in stacked.items():
            np.testing.assert_allclose(out[k], np.average(arr, axis=0, weights=weights), rtol=0, atol=1e-6)
        return peak

    small, large = run(5), run(150)
    assert large < 1.5 * small + 256 * 1024, (small, large)  # running sums only: nothing kept per update


def test_accumulation_is_float64():
    """2**25 + 1 is not a float32: float32 running sums would lose every small update below."""
    specs = [TensorSpec("x", (4,))]
    s = FedAvg()
    s.begin_round(specs, {})
    ones = {"x": np.ones(4, np.float32)}
    s.accumulate(ones, 2 ** 25)
    for _ in range(1000):
        s.accumulate(ones, 1)
    np.testing.assert_array_equal(s.finalize()["x"], np.ones(4, np.float32))
    assert s.total_samples == 2 ** 25 + 1000


def test_rounds_start_clean_and_misuse_is_refused():
    m = synthetic_manifest()
    s = FedAvg()
    with pytest.raises(RuntimeError, match="before begin_round"):
        s.accumulate(random_adapter(m, 0), 3)
    s.begin_round(m.trainable, {})
    assert s.finalize() is None  # no updates, no new global
    with pytest.raises(ValueError, match="positive"):
        s.accumulate(random_adapter(m, 0), 0)
    s.accumulate(random_adapter(m, 1), 7)
    s.begin_round(m.trainable, {})
    s.accumulate(random_adapter(m, 2), 1)
    out = s.finalize()
    assert s.count == 1
    np.testing.assert_allclose(out[m.trainable[0].name], random_adapter(m, 2)[m.trainable[0].name], atol=1e-7)


def test_a_strategy_is_one_class_in_the_registry(monkeypatch):
    class Latest(Strategy):
        """Keeps the last update: a one-file strategy, as a new one would be added."""

        name = "latest"

        def begin_round(self, specs: Sequence[TensorSpec], current_global: Mapping[str, np.ndarray]) -> None:
            self._last: Optional[Dict[str, np.ndarray]] = None

        def accumulate(self, tensors: Mapping[str, np.ndarray], num_samples: int) -> None:
            self._last = {k: np.array(v, np.float32) for k, v in tensors.items()}

        def finalize(self) -> Optional[Dict[str, np.ndarray]]:
            return self._last

        @property
        def count(self) -> int:
            return int(self._last is not None)

    assert {"fedavg", "flexlora", "fedavgm", "fedadam", "fedyogi"} <= set(STRATEGIES) and "latest" not in STRATEGIES
    monkeypatch.setitem(STRATEGIES, "latest", Latest)
    s = make_strategy("latest")
    s.begin_round([], {})
    s.accumulate({"x": np.ones(2)}, 1)
    assert s.count == 1 and s.finalize()["x"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"unknown aggregation strategy 'nope'; known: \[.*'fedavg'.*'latest'"):
        make_strategy("nope")


def test_a_weight_float64_cannot_hold_is_refused_before_any_sum_changes():
    specs = [TensorSpec("x", (3,))]
    s = FedAvg()
    s.begin_round(specs, {})
    s.accumulate({"x": np.ones(3, np.float32)}, 3)
    for bad in (10 ** 400, True, 2.5, -1, 0):  # float(10**400) raises OverflowError: that was a crash
        with pytest.raises(ValueError, match="num_samples"):
            s.accumulate({"x": np.full(3, 5.0, np.float32)}, bad)
    assert s.count == 1 and s.total_samples == 3
    np.testing.assert_array_equal(s.finalize()["x"], np.ones(3, np.float32))
    s.accumulate({"x": np.ones(3, np.float32)}, np.int64(2))  # numpy integers are fine


def test_an_overflowing_round_is_reported_not_raised_as_overflow():
    s = FedAvg()
    s.begin_round([TensorSpec("x", (2,))], {})
    for _ in range(2):
        s.accumulate({"x": np.full(2, 1e4, np.float32)}, 10 ** 305)  # 2e309: inf in float64, no warning raised
    assert not np.isfinite(s.finalize()["x"]).any()  # the aggregator refuses to commit this (test_checkpoint)
    s.accumulate({"x": np.ones(2, np.float32)}, 10 ** 308)
    s.accumulate({"x": np.ones(2, np.float32)}, 10 ** 308)  # each weight fits a float64, their total does not
    with pytest.raises(ValueError, match="too large for float64"):
        s.finalize()
