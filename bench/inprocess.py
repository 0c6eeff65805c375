"""An in-process federation on digits for the privacy and robustness benchmarks: N virtual clients in one
process, with the same pieces as flora-sim's agents and aggregator, minus MQTT.

Each client is a `ClientTrainer` of one shared step-graph session (edge/trainers/shared.py: its own LoRA
tensors and AdamW moments, kept across rounds as an agent keeps them), trains with
`edge.training.train_round` on its shard's cached image features, and its update goes through what an
agent does to it (`edge.dp.clip_update` under DP; `sim.attacks` for an attacker) into a broker strategy
(`broker.strategies.make_strategy`), whose new global is tested on the held-out digits with the
bundle's inference model (`edge.evaluate.AdapterEvaluator`); DP rounds are charged by
`broker.accountant.PrivacyLedger`. The data is scikit-learn's digits written as images
(`sim.datasets.write_digits`), split among the clients by `sim.partition`, the bundle a clip-tiny
export (random init) with the step backend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from flora.broker.accountant import DPSettings, PrivacyLedger
from flora.broker.strategies import make_strategy
from flora.edge import dp
from flora.edge.adapter import load_file
from flora.edge.bundle import ADAPTER, Bundle, load_bundle
from flora.edge.evaluate import AdapterEvaluator
from flora.edge.features import FeatureCache, image_features
from flora.edge.trainers.shared import SharedStepTrainer
from flora.edge.training import LocalData, train_round
from flora.sim.attacks import Attack
from flora.sim.datasets import write_digits
from flora.sim.partition import partition


@dataclass
class Setting:
    clients: int = 100
    rounds: int = 30
    per_round: Optional[int] = None  # None: every client every round
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 32
    partition: str = "iid"
    seed: int = 0
    strategy: str = "fedavg"
    strategy_options: Dict[str, Any] = field(default_factory=dict)
    dp: Optional[DPSettings] = None
    attackers: List[int] = field(default_factory=list)
    attack: Optional[str] = None


def export(work: Path, variant: str, classes: List[str], seed: int = 0) -> Bundle:
    """A clip-tiny bundle (step backend) for `variant`, exported once into `work` and reused."""
    out = work / f"bundle-{variant}-seed{seed}"
    if (out / "manifest.json").is_file():
        return load_bundle(out)
    from flora.export.pipeline import ExportOptions, export_bundle

    export_bundle(ExportOptions(preset="clip-tiny", classes=classes, out=out, backends=("step",), seed=seed,
                                lora_variant=variant, force=True), say=lambda _m: None)
    return load_bundle(out)


class Digits:
    """The digits split, with image features per bundle (cached on disk)."""

    def __init__(self, work: Path, seed: int = 0) -> None:
        self.work = work
        self.data = write_digits(work / "digits", seed=seed)
        self.classes = list(self.data.classes)

    def features(self, bundle: Bundle):
        cache = FeatureCache(self.work / "features.sqlite")
        try:
            train = image_features(bundle, [s.path for s in self.data.train], cache)
            test = image_features(bundle, [s.path for s in self.data.test], cache)
        finally:
            cache.close()
        return (train, np.array([s.label for s in self.data.train]), test,
                np.array([s.label for s in self.data.test]))


def federate(bundle: Bundle, digits: Digits, setting: Setting, log=print) -> Dict[str, Any]:
    """Run the federation; returns the test accuracy after each round (index 0: before any), epsilon per round
    and the round times."""
    s = setting
    train_x, train_y, test_x, test_y = digits.features(bundle)
    parts = partition(train_y, s.clients, s.partition, s.seed)
    attack = Attack.parse(s.attack) if s.attack else None
    shared = SharedStepTrainer(bundle, threads=1)
    clients, data = [], []
    for i, idx in enumerate(parts):
        labels = train_y[idx]
        if attack is not None and i in s.attackers:
            labels = attack.poison_labels(labels, len(digits.classes))
        trainer = shared.client()
        trainer.set_lr(s.lr)
        clients.append(trainer)
        data.append(LocalData(labels, features=train_x[idx]))
    evaluator = AdapterEvaluator(bundle, threads=1)
    test = LocalData(test_y, features=test_x)
    global_ = load_file(bundle.path(ADAPTER), bundle.manifest.trainable).as_float32()
    strategy = make_strategy(s.strategy, s.strategy_options)
    ledger = PrivacyLedger(s.dp) if s.dp is not None else None
    rng = np.random.default_rng(s.seed)
    accuracy = [evaluator.evaluate(global_, test).accuracy]
    epsilons: List[float] = []
    norms: List[float] = []
    seconds: List[float] = []
    for r in range(s.rounds):
        t0 = time.perf_counter()
        asked = sorted(rng.choice(s.clients, s.per_round, replace=False)) if s.per_round else list(range(s.clients))
        strategy.begin_round(bundle.manifest.trainable, global_)
        strategy.set_round_size(len(asked))
        for i in asked:
            trainer = clients[i]
            trainer.set_adapter(global_)
            train_round(trainer, data[i], epochs=s.epochs, batch_size=s.batch_size, seed=s.seed * 100003 + r * 1000 + i)
            local = trainer.get_adapter()
            norms.append(dp.delta_norm(local, global_))
            if attack is not None and attack.poisons_model and i in s.attackers:
                local = attack.poison_update(local, global_, rng)
            if s.dp is not None:  # what the agent does when the round asks for a clip norm
                local = dp.clip_update(local, global_, s.dp.clip).tensors
            strategy.accumulate(local, len(data[i]))
        new = strategy.finalize()
        assert new is not None
        if ledger is not None:
            z = getattr(strategy, "effective_noise_multiplier", s.dp.noise_multiplier)
            epsilons.append(ledger.charge(len(asked), s.clients, z, [str(i) for i in asked])["epsilon"])
        global_ = new
        accuracy.append(evaluator.evaluate(global_, test).accuracy)
        seconds.append(time.perf_counter() - t0)
        log(f"  round {r + 1}/{s.rounds}: test accuracy {accuracy[-1]:.4f}"
            + (f", epsilon {epsilons[-1]:.3f}" if epsilons else "") + f" ({seconds[-1]:.1f} s)")
    return {"accuracy": accuracy, "epsilon": epsilons, "round_seconds": seconds,
            "median_update_norm": float(np.median(norms)) if norms else None,
            "client_sizes": [len(p) for p in parts]}
