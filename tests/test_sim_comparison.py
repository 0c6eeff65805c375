"""The sim's fair comparisons: step counts, the step stream, the converged and rounds-to-target figures,
and mean +- sd over seeds (no federation needed)."""

from __future__ import annotations

import numpy as np
import pytest

from flora.sim.baselines import BatchStream, equal_steps, steps_per_round
from flora.sim.report import comparison, last_mean, mean_sd, rounds_to, seeds_report, steps_x, summary


def test_equal_steps_is_the_sample_weighted_mean_of_client_steps():
    sizes = [155, 347, 450, 343]  # the demo's training splits
    s = [steps_per_round(n, 5, 32) for n in sizes]
    assert s == [25, 55, 75, 55]
    assert equal_steps(sizes, 5, 32) == round(sum(n * k for n, k in zip(sizes, s)) / sum(sizes)) == 58
    assert steps_per_round(sum(sizes), 5, 32) == 205  # what equal epochs takes on the union: 3.5x
    assert equal_steps([1], 1, 32) == 1
    with pytest.raises(ValueError):
        equal_steps([0, 0], 1, 32)


def test_the_step_stream_covers_every_sample_once_an_epoch_across_rounds():
    stream = BatchStream(10, 4, seed=3)
    batches = [stream.next() for _ in range(6)]  # two epochs of 4 + 4 + 2
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    for epoch in (batches[:3], batches[3:]):
        assert sorted(np.concatenate(epoch).tolist()) == list(range(10))
    assert not np.array_equal(np.concatenate(batches[:3]), np.concatenate(batches[3:]))  # reshuffled
    again = BatchStream(10, 4, seed=3)
    assert all(np.array_equal(again.next(), b) for b in batches)


def test_converged_means_and_rounds_to_target():
    acc = {"federated": [0.5, 0.6, 0.8, 0.85, 0.9, 0.92], "centralised": [None, 0.9, 0.93, 0.94, 0.94, 0.94],
           "centralised_equal_steps": [None, 0.7, 0.85, 0.9, 0.92, 0.93], "local_only": [None, 0.6, 0.7, 0.7, 0.7, 0.7],
           "zero_shot": 0.5}
    assert last_mean(acc["federated"], 2) == pytest.approx(0.91)
    assert last_mean(acc["federated"], 99) == pytest.approx(np.mean(acc["federated"][1:]))  # round 0 never counts
    assert last_mean([0.1, None], 1) is None
    assert rounds_to(acc["federated"], 0.85) == 3 and rounds_to(acc["federated"], 0.95) is None
    assert rounds_to([0.99, 0.1], 0.9) is None  # round 0 (zero-shot) is not reaching it
    comp = comparison(acc, window=2)
    assert comp["window"] == 2 and comp["final"]["federated"] == 0.92
    assert comp["target"]["accuracy"] == pytest.approx(0.95 * 0.94)
    assert comp["rounds_to_target"] == {"federated": 4, "centralised_equal_steps": 3, "centralised": 1,
                                        "local_only": None}
    assert comp["plateaued"]["centralised"] and not comp["plateaued"]["federated"]


def test_step_axis_and_the_summary_say_what_each_arm_runs():
    report = {"accuracy": {"federated": [0.1, 0.5, 0.6], "centralised": [None, 0.7, 0.8],
                           "centralised_equal_steps": [None, 0.5, 0.7], "local_only": [None, 0.3, 0.4],
                           "zero_shot": 0.1},
              "steps": {"per_round": {"federated": 58, "centralised": 205, "centralised_equal_steps": 58,
                                      "local_only": {"client-0": 25, "client-1": 55}}},
              "out": "runs/x"}
    assert steps_x(report, "federated") == [0, 58, 116]
    assert steps_x(report, "local_only") == [0, 40, 80]  # the curve is the clients' mean
    text = summary(report)
    assert "centralised LoRA, equal steps" in text and "205" in text and "25-55 (per client)" in text
    assert "rounds to 95% of centralised's last-2 mean" in text


def test_seed_runs_are_reported_as_mean_and_sd():
    def run(seed, fed):
        acc = {"federated": [0.1, fed], "zero_shot": 0.1}
        return {"config": {}, "dataset": {}, "partition": {"scheme": "iid"}, "seeds": {"model": seed, "data": seed},
                "out": f"s{seed}", "accuracy": acc, "comparison": comparison(acc)}

    agg = seeds_report([run(0, 0.8), run(1, 0.9), run(2, 1.0)], out="o")
    fed = agg["stats"]["federated"]["final"]
    assert fed["mean"] == pytest.approx(0.9) and fed["sd"] == pytest.approx(0.1) and fed["n"] == 3
    assert agg["mean_curves"]["federated"] == pytest.approx([0.1, 0.9])
    assert [s["model"] for s in agg["seeds"]] == [0, 1, 2]
    assert mean_sd([0.5]) == {"mean": 0.5, "sd": None, "n": 1}
