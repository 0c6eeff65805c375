"""One simulated federation: data shards on disk, a private mosquitto, the aggregator and N agent
processes, a live table of every round, optional baselines, and report.json / report.png."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from broker.checkpoint import STATE, Checkpoint
from broker.mosquitto import start_mosquitto
from edge.bundle import Bundle, BundleError, load_bundle
from edge.dataset import Sample
from edge.features import FeatureCache, image_features
from edge.training import LocalData

from .datasets import SplitDataset, load_folder_dataset, write_digits
from .partition import histogram_skew, parse_scheme, partition
from .processes import ProcessGroup, describe_failure

log = logging.getLogger("flora.sim")
FEDERATION = "sim"


@dataclass
class SimConfig:
    model: str = "clip-tiny"
    clients: int = 4
    rounds: int = 10
    partition: str = "iid"
    dataset: str = "digits"
    out: Path = Path("runs/sim")
    shots: Optional[int] = None
    epochs: int = 5
    lr: float = 3e-3
    batch_size: int = 32
    seed: int = 0
    compare: bool = False
    backend: str = "auto"
    fp16_updates: bool = False
    bundle: Optional[Path] = None
    val_fraction: float = 0.1
    round_timeout: float = 120.0
    timeout: float = 1800.0
    random_init: bool = False


class SimError(RuntimeError):
    pass


def prepare_data(cfg: SimConfig) -> SplitDataset:
    if cfg.dataset == "digits":
        return write_digits(cfg.out / "data" / "digits", seed=cfg.seed)
    path = Path(cfg.dataset)
    if not path.is_dir():
        raise SimError(f"dataset {cfg.dataset!r} is neither 'digits' nor an image folder")
    return load_folder_dataset(path, seed=cfg.seed)


def prepare_bundle(cfg: SimConfig, classes: List[str], say: Callable[[str], None]) -> Bundle:
    """The given bundle, the one a previous run exported for these classes, or a fresh export."""
    if cfg.bundle is not None:
        bundle = load_bundle(cfg.bundle)
        if list(bundle.manifest.classes) != classes:
            raise SimError(f"bundle {cfg.bundle} has classes {list(bundle.manifest.classes)}, the data has {classes}")
        return bundle
    target = cfg.out / "bundle"
    try:
        bundle = load_bundle(target)
        if list(bundle.manifest.classes) == classes and bundle.manifest.preset == cfg.model:
            say(f"reusing the bundle in {target}")
            return bundle
    except BundleError:
        pass
    from export.pipeline import ExportOptions, export_bundle

    say(f"exporting {cfg.model} for {len(classes)} classes into {target}")
    export_bundle(ExportOptions(preset=cfg.model, classes=classes, out=target, force=True,
                                random_init=cfg.random_init, seed=cfg.seed), say=lambda m: say(f"  {m}"))
    return load_bundle(target)


def write_csv(path: Path, samples: List[Sample], classes: List[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("path,label\n" + "".join(f"{s.path.resolve()},{classes[s.label]}\n" for s in samples))


def shard(cfg: SimConfig, data: SplitDataset) -> List[List[Sample]]:
    parse_scheme(cfg.partition)
    parts = partition(data.train_labels, cfg.clients, cfg.partition, cfg.seed)
    shards = [[data.train[i] for i in p] for p in parts]
    if cfg.shots:
        from edge.dataset import few_shot

        shards = [few_shot(s, cfg.shots, cfg.seed + i) for i, s in enumerate(shards)]
    return shards


class Table:
    HEADER = (f"{'round':>5} {'clients':>8} {'test acc':>9} {'test loss':>10} {'MB up':>8} {'MB down':>8} "
              f"{'round s':>8} {'elapsed s':>10}")

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.say(self.HEADER)
        self.say("-" * len(self.HEADER))

    def zero_shot(self, acc: Optional[float], loss: Optional[float], elapsed: float) -> None:
        self.say(f"{0:>5} {'-':>8} {_f(acc):>9} {_f(loss):>10} {'-':>8} {'-':>8} {'-':>8} {elapsed:>10.1f}")

    def row(self, r: Dict, elapsed: float) -> None:
        self.say(f"{r['round'] + 1:>5} {r['num_reported']:>4}/{r['num_asked']:<3} {_f(r.get('test_accuracy')):>9} "
                 f"{_f(r.get('test_loss')):>10} {r['bytes_received'] / 1e6:>8.3f} {r['bytes_sent'] / 1e6:>8.3f} "
                 f"{r['wall_time_s']:>8.1f} {elapsed:>10.1f}")


def _f(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


def run(cfg: SimConfig, say: Callable[[str], None] = print) -> Dict:
    t_start = time.monotonic()
    cfg.out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg)
    bundle = prepare_bundle(cfg, data.classes, say)
    shards = shard(cfg, data)
    hist = np.stack([np.bincount([s.label for s in sh], minlength=len(data.classes)) for sh in shards])
    skew = histogram_skew(hist)
    for i, sh in enumerate(shards):
        write_csv(cfg.out / "clients" / f"client-{i}" / "data.csv", sh, data.classes)
    write_csv(cfg.out / "test.csv", data.test, data.classes)
    say(f"{data.name}: {len(data.train)} training images in {cfg.clients} shards ({cfg.partition}, label skew "
        f"{skew:.3f}; sizes {[len(s) for s in shards]}), {len(data.test)} held-out test images")

    state_dir = cfg.out / "aggregator"
    for stale in (state_dir, *(cfg.out / "clients" / f"client-{i}" / "state" for i in range(cfg.clients))):
        if stale.exists():
            shutil.rmtree(stale)  # a new run, not a resume
    broker = start_mosquitto(cfg.out / "mosquitto")
    group = ProcessGroup(cfg.out / "logs")
    say(f"mosquitto on {broker.url}; logs in {cfg.out / 'logs'}")
    try:
        group.start("aggregator", "broker.cli", [
            "--bundle", str(bundle.root), "--broker", broker.url, "--federation", FEDERATION,
            "--rounds", str(cfg.rounds), "--state-dir", str(state_dir), "--wait-for-clients", str(cfg.clients),
            "--min-clients", str(cfg.clients), "--round-timeout", str(cfg.round_timeout),
            "--epochs", str(cfg.epochs), "--lr", str(cfg.lr), "--batch-size", str(cfg.batch_size),
            "--seed", str(cfg.seed), "--eval-data", str(cfg.out / "test.csv"), "--wait-timeout", "300"])
        agents = []
        for i in range(cfg.clients):
            args = ["--bundle", str(bundle.root), "--data", str(cfg.out / "clients" / f"client-{i}" / "data.csv"),
                    "--broker", broker.url, "--client-id", f"client-{i}", "--federation", FEDERATION,
                    "--state-dir", str(cfg.out / "clients" / f"client-{i}" / "state"), "--exit-when-done",
                    "--val-fraction", str(cfg.val_fraction), "--seed", str(cfg.seed + i), "--backend", cfg.backend,
                    "--threads", "1"]
            if cfg.fp16_updates:
                args.append("--fp16-updates")
            agents.append(group.start(f"client-{i}", "edge.cli", args))
        rows = watch(cfg, state_dir, group, t_start, say)
        if not group.wait(agents, timeout=60):
            raise SimError("the agents did not exit after the federation finished")
    finally:
        group.stop()
        broker.stop()
    state = json.loads((state_dir / STATE).read_text())
    initial = state.get("extra", {}).get("initial_eval", {})
    federated = [initial.get("test_accuracy")] + [r.get("test_accuracy") for r in rows]
    report: Dict = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "dataset": {"name": data.name, "classes": data.classes, "train": len(data.train), "test": len(data.test)},
        "partition": {"scheme": cfg.partition, "label_skew": skew, "client_sizes": [len(s) for s in shards],
                      "label_histogram": hist.tolist(), "non_iid": cfg.partition != "iid"},
        "bundle": {"path": str(bundle.root), "model_id": bundle.manifest.model_id, "preset": bundle.manifest.preset,
                   "lora": asdict(bundle.manifest.lora)},
        "accuracy": {"federated": federated, "zero_shot": initial.get("test_accuracy")},
        "rounds": [{k: r.get(k) for k in ("round", "num_asked", "num_reported", "samples", "test_accuracy",
                                          "test_loss", "mean_client_accuracy", "bytes_received", "bytes_sent",
                                          "global_bytes", "wall_time_s", "rejection_counts")} for r in rows],
        "bytes": {"up_per_round": [r["bytes_received"] for r in rows],
                  "down_per_round": [r["bytes_sent"] for r in rows]},
        "federated_seconds": round(time.monotonic() - t_start, 1),
        "out": str(cfg.out),
    }
    if cfg.compare:
        report["accuracy"].update(compare(cfg, bundle, shards, data, say))
    write_report(cfg.out, report, say)
    say(summary(report))
    return report


def watch(cfg: SimConfig, state_dir: Path, group: ProcessGroup, t_start: float, say) -> List[Dict]:
    """Print a table row for every round the aggregator completes; return the history rows."""
    table = Table(say)
    shown_zero, rows = False, []
    deadline = time.monotonic() + cfg.timeout
    aggregator = group.children[0]
    while True:
        failed = [describe_failure(c) for c in group.failed()]
        if failed:
            raise SimError("a federation process failed:\n" + "\n".join(f for f in failed if f))
        if not shown_zero and (state_dir / STATE).exists():
            initial = json.loads((state_dir / STATE).read_text()).get("extra", {}).get("initial_eval")
            if initial:  # may hold only a hook_error if the evaluation failed; the row then shows "-"
                table.zero_shot(initial.get("test_accuracy"), initial.get("test_loss"), time.monotonic() - t_start)
                shown_zero = True
        history = Checkpoint(state_dir).history() if state_dir.exists() else []
        for r in history[len(rows):]:
            table.row(r, time.monotonic() - t_start)
        rows = history
        if not aggregator.alive() and aggregator.process.returncode == 0:
            return rows
        if time.monotonic() > deadline:
            raise SimError(f"the federation did not finish within {cfg.timeout:.0f} s (see {cfg.out / 'logs'})")
        time.sleep(0.2)


def compare(cfg: SimConfig, bundle: Bundle, shards: List[List[Sample]], data: SplitDataset, say) -> Dict:
    from . import baselines

    if not bundle.manifest.needs_image_encoder:
        raise SimError("--compare needs a text-tower bundle (features computed once)")
    cache = FeatureCache(cfg.out / "features.sqlite")
    try:
        def local(samples: List[Sample]) -> LocalData:
            labels = np.array([s.label for s in samples], dtype=np.int64)
            return LocalData(labels, features=image_features(bundle, [s.path for s in samples], cache))

        train_shards = [local(s) for s in shards]
        test = local(data.test)
    finally:
        cache.close()
    kw = dict(rounds=cfg.rounds, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
              backend=cfg.backend)
    say("baselines: centralised LoRA on the union of the shards, local-only LoRA on each shard")
    central = baselines.centralised(bundle, train_shards, test, **kw)
    local_curves = baselines.local_only(bundle, train_shards, test, **kw)
    return {"centralised": [None, *central], "local_only": [None, *local_curves["mean"]],
            "local_only_per_client": local_curves}


def write_report(out: Path, report: Dict, say) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: wrote report.json only (pip install 'flora-edge[plot]')")
        return
    acc = report["accuracy"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    xs = list(range(len(acc["federated"])))
    ax.plot(xs, acc["federated"], marker="o", label="federated LoRA (FedAvg)")
    if "centralised" in acc:
        ax.plot(xs[1:], acc["centralised"][1:], marker="s", label="centralised LoRA")
        ax.plot(xs[1:], acc["local_only"][1:], marker="^", label="local-only LoRA (mean)")
    if acc.get("zero_shot") is not None:
        ax.axhline(acc["zero_shot"], color="grey", linestyle="--", label="zero-shot")
    ax.set_xlabel("rounds")
    ax.set_ylabel("held-out test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{report['dataset']['name']}, {report['config']['clients']} clients, {report['partition']['scheme']}")
    rounds = [r["round"] for r in report["rounds"]]
    bx.bar([r - 0.2 for r in rounds], [b / 1e6 for b in report["bytes"]["up_per_round"]], width=0.4, label="up")
    bx.bar([r + 0.2 for r in rounds], [b / 1e6 for b in report["bytes"]["down_per_round"]], width=0.4, label="down")
    bx.set_xlabel("round")
    bx.set_ylabel("MB")
    bx.legend()
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)


def summary(report: Dict) -> str:
    acc = report["accuracy"]
    lines = [f"final held-out test accuracy after {len(acc['federated']) - 1} rounds:",
             f"  federated LoRA   {_f(acc['federated'][-1])}"]
    if "centralised" in acc:
        lines += [f"  centralised LoRA {_f(acc['centralised'][-1])}", f"  local-only LoRA  {_f(acc['local_only'][-1])}"]
    lines.append(f"  zero-shot        {_f(acc['zero_shot'])}")
    out = Path(report["out"])
    lines.append(f"report: {out / 'report.json'} and {out / 'report.png'}")
    return "\n".join(lines)
