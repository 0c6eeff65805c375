"""flora-sim with a poisoned device, a DP budget and the strategy options: a real federation over mosquitto."""

from __future__ import annotations

import json
import math

import pytest

from flora.broker import accountant as A
from flora.sim import cli

pytestmark = pytest.mark.mqtt


def test_a_dp_run_with_a_boosting_attacker_spends_the_calibrated_epsilon_and_clips_the_attacker(tmp_path,
                                                                                               mosquitto_binary):
    out = tmp_path / "run"
    code = cli.main(["--clients", "3", "--rounds", "2", "--epochs", "1", "--out", str(out), "--round-timeout", "60",
                     "--malicious", "1", "--attack", "scale:100", "--dp-clip", "0.05", "--dp-epsilon", "30"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    threats = report["threats"]
    assert threats["attack"] == "scale:100" and len(threats["attackers"]) == 1
    (attacker,) = threats["attackers"]
    assert "POISONED update (scale:100)" in (out / "logs" / f"{attacker}.log").read_text()
    z = threats["dp"]["noise_multiplier"]
    assert math.isclose(z, A.noise_for_epsilon(30, 2, 1.0), rel_tol=1e-9)
    eps = report["epsilon"]
    assert eps == sorted(eps) and len(eps) == 2 and eps[-1] <= 30 + 1e-9
    assert math.isclose(eps[-1], A.epsilon([A.RoundEvent(1.0, z)] * 2), rel_tol=1e-6)
    rows = report["rounds"]
    assert all(r["strategy"] == "dp-fedavg" for r in rows)
    # the attacker's boosted update never enters a round unbounded: the influence bound refuses it (a norm far
    # above the others'), or, when it gets through, DP-FedAvg's server clip clips it
    history = [json.loads(line) for line in (out / "aggregator" / "history.jsonl").read_text().splitlines()]
    for r in history:
        refused = (r.get("influence") or {}).get("refused", {}).get(attacker) == "norm-outlier"
        assert refused or (attacker in r["reported"] and r["dp"]["clipped"] >= 1), r


def test_attack_and_dp_options_are_checked_before_anything_runs(tmp_path, capsys):
    for args, message in ((["--malicious", "1"], "--malicious needs --attack"),
                          (["--attack", "scale:10"], "--attack needs --malicious"),
                          (["--malicious", "9", "--attack", "sign-flip"], "--malicious must lie in [0, 4]"),
                          (["--dp-epsilon", "1"], "need --dp-clip"),
                          (["--dp-clip", "1", "--dp-epsilon", "1", "--dp-noise-multiplier", "2"], "not both")):
        assert cli.main(["--out", str(tmp_path / "x"), *args]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
