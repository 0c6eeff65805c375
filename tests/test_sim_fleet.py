"""flora-sim at fleet settings: virtual clients sharing one session per process give each client exactly the
results it has in a process of its own; asynchronous rounds with a 5x slower agent reach the synchronous
run's accuracy sooner, the straggler's stale updates weighted or rejected as configured."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List

import numpy as np
import pytest

from flora.edge import adapter
from flora.sim import cli
from flora.sim.run import SimConfig, SimError, effective_backend

pytestmark = pytest.mark.mqtt


def sim(out: Path, *args: str) -> dict:
    assert cli.main(["--out", str(out), "--round-timeout", "60", *args]) == 0
    return json.loads((out / "report.json").read_text())


def history(state_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (state_dir / "history.jsonl").read_text().splitlines()]


def final_global(state_dir: Path) -> dict:
    state = json.loads((state_dir / "state.json").read_text())
    return adapter.decode((state_dir / state["global_file"]).read_bytes()).as_float32()


def test_hosting_needs_the_step_backend():
    assert effective_backend(SimConfig(clients=8, processes=2)) == "step"
    assert effective_backend(SimConfig(clients=8, processes=8, backend="ort-training")) == "ort-training"
    with pytest.raises(SimError, match="step backend"):
        effective_backend(SimConfig(clients=8, processes=2, backend="ort-training"))
    assert SimConfig(clients=4, rounds=3).async_versions == 4  # 12 updates in buffers of 3


@pytest.mark.slow
def test_virtual_clients_in_two_processes_match_one_process_per_client(tmp_path, mosquitto_binary,
                                                                        tiny_all_bundle):
    common = ["--clients", "4", "--rounds", "2", "--epochs", "1", "--backend", "step", "--bundle",
              str(tiny_all_bundle.root)]
    hosted = sim(tmp_path / "hosted", *common, "--processes", "2")
    alone = sim(tmp_path / "alone", *common)
    assert (tmp_path / "hosted" / "logs" / "host-1.log").exists()
    assert not (tmp_path / "alone" / "logs" / "host-0.log").exists()
    assert hosted["accuracy"]["federated"] == alone["accuracy"]["federated"]
    for a, b in zip(history(tmp_path / "hosted" / "aggregator"), history(tmp_path / "alone" / "aggregator")):
        assert a["reported"] == b["reported"] and sorted(a["metrics"]) == [f"client-{i}" for i in range(4)]
        for client, metrics in a["metrics"].items():  # each client's own loss and validation accuracy
            assert (metrics["loss"], metrics["accuracy"]) == (b["metrics"][client]["loss"],
                                                              b["metrics"][client]["accuracy"])
    got, expected = final_global(tmp_path / "hosted" / "aggregator"), final_global(tmp_path / "alone" / "aggregator")
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


@pytest.mark.slow
def test_async_reaches_the_sync_accuracy_sooner_with_a_five_times_slower_agent(tmp_path, mosquitto_binary,
                                                                                tiny_text_bundle):
    common = ["--clients", "4", "--rounds", "4", "--epochs", "2", "--mode", "async", "--straggler-factor", "5",
              "--bundle", str(tiny_text_bundle.root)]
    report = sim(tmp_path / "weighted", *common)
    modes = report["modes"]
    assert modes["sync"]["globals"] == 4 and modes["async"]["globals"] == 6  # 16 updates in buffers of 3
    assert modes["async"]["time_to_target_s"] is not None
    assert modes["async"]["time_to_target_s"] < modes["sync"]["time_to_target_s"]
    rows = history(tmp_path / "weighted" / "aggregator")
    straggler = [(row["round"] - base, weight) for row in rows for client, base, _, weight in row["accepted"]
                 if client == "client-3"]
    assert straggler and any(s > 0 for s, _ in straggler)  # it trains from versions the others moved past
    for staleness, weight in straggler:  # weighted 1/(1 + sqrt(staleness)) (--staleness sqrt, the default)
        assert weight == pytest.approx(1 / (1 + math.sqrt(staleness)))

    rejecting = sim(tmp_path / "rejecting", *common, "--max-staleness", "0")
    assert rejecting["modes"]["async"]["rejection_counts"].get("stale", 0) >= 1
    rows = history(tmp_path / "rejecting" / "aggregator")
    assert all(base == row["round"] for row in rows for _, base, _, _ in row["accepted"])  # only fresh ones
