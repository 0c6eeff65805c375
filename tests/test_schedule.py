"""Per-round learning rate, optimizer resets and early stopping on a plateau: pure rules, the round message,
and the aggregator driven without a broker."""

from __future__ import annotations

import json
import math

import pytest

from flora.broker.schedule import Plateau, round_lr
from flora.edge.protocol import ProtocolError, RoundAnnouncement, TrainConfig

from .fakes import run_rounds


def test_cosine_runs_from_the_peak_to_just_above_zero_and_constant_stays():
    lrs = [round_lr(1e-3, "cosine", r, 10) for r in range(10)]
    assert lrs[0] == 1e-3 and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[5] == pytest.approx(0.5e-3) and 0 < lrs[-1] == pytest.approx(1e-3 * (1 + math.cos(0.9 * math.pi)) / 2)
    assert round_lr(1e-3, "cosine", 99, 10) == lrs[-1]  # past the end: the last round's value, never 0
    assert [round_lr(2e-3, "constant", r, 10) for r in (0, 9)] == [2e-3, 2e-3]
    with pytest.raises(ValueError, match="unknown lr schedule"):
        round_lr(1e-3, "step", 0, 10)


def test_a_plateau_needs_two_full_windows_of_known_values():
    rule = Plateau(window=3, min_delta=0.01)
    rising = [0.1 * i for i in range(8)]
    assert not rule.reached(rising)
    flat = [0.2, 0.3, 0.5, 0.50, 0.51, 0.50, 0.505, 0.5]
    assert not rule.reached(flat[:5])  # fewer than 2 windows
    assert rule.reached(flat)  # last 3 mean 0.5017 vs 0.5033 before
    assert not rule.reached([*flat[:-1], None])
    with pytest.raises(ValueError):
        Plateau(window=0)


def test_reset_optimizer_is_sent_only_when_asked_and_checked_on_receipt():
    def ann(cfg: TrainConfig) -> RoundAnnouncement:
        return RoundAnnouncement(0, "m", "training", cfg, "all", 1.0, "0" * 64, 3)

    plain = json.loads(ann(TrainConfig()).to_json())
    assert "reset_optimizer" not in plain["config"]  # agents that predate the key read it as before
    assert RoundAnnouncement.from_json(ann(TrainConfig()).to_json()).config.reset_optimizer is False
    asked = ann(TrainConfig(reset_optimizer=True)).to_json()
    assert json.loads(asked)["config"]["reset_optimizer"] is True
    assert RoundAnnouncement.from_json(asked).config.reset_optimizer is True
    bad = json.loads(asked)
    bad["config"]["reset_optimizer"] = "yes"
    with pytest.raises(ProtocolError, match="reset_optimizer"):
        RoundAnnouncement.from_json(json.dumps(bad))


def test_the_round_message_carries_each_rounds_lr_and_the_reset(tmp_path):
    agg = run_rounds(tmp_path, 4, train=TrainConfig(lr=0.01, reset_optimizer=True), lr_schedule="cosine")
    sent = agg.client.announcements()
    assert [a.config.lr for a in sent] == pytest.approx([round_lr(0.01, "cosine", r, 4) for r in range(4)])
    assert all(a.config.reset_optimizer for a in sent)
    assert [r["lr"] for r in agg.checkpoint.history()] == pytest.approx([a.config.lr for a in sent])
    with pytest.raises(ValueError, match="unknown lr schedule"):
        run_rounds(tmp_path / "bad", 2, lr_schedule="linear")


def test_a_plateau_ends_the_federation_early_and_the_row_says_so(tmp_path):
    accuracy = iter([0.2, 0.4, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6])
    agg = run_rounds(tmp_path, 50, stop_on_plateau=Plateau(window=2, min_delta=0.0),
                     on_round_closed=lambda r, t: {"test_accuracy": next(accuracy)})
    rows = agg.checkpoint.history()
    assert len(rows) == 6 and agg.state.done and agg.state.round == 6  # 0.6, 0.6 after 0.6, 0.6: flat
    assert rows[-1]["stopped"] == "plateau" and not any(r.get("stopped") for r in rows[:-1])
