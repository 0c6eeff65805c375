"""One simulated federation: data shards on disk, a private mosquitto, the aggregator and N agent
processes, a live table of every round, optional baselines, and report.json / report.png."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from flora.broker.checkpoint import STATE, Checkpoint
from flora.broker.enroll import FederationPKI
from flora.broker.mosquitto import Mosquitto, certificate_listener, start_mosquitto
from flora.broker.report import epsilon_of
from flora.edge import adapter
from flora.edge.bundle import IMAGE_ENCODER_INT8, Bundle, BundleError, load_bundle
from flora.edge.dataset import Sample
from flora.edge.errors import FloraError
from flora.edge.features import FeatureCache, image_features
from flora.edge.trainers import TRAINERS, available_backends
from flora.edge.training import LocalData

from .adversarial import Threats
from .baselines import client_seed, equal_steps, steps_per_round, training_splits
from .datasets import SplitDataset, load_folder_dataset, write_digits
from .partition import histogram_skew, parse_scheme, partition
from .processes import Child, ProcessGroup, describe_failure
from .report import comparison, seeds_report, seeds_summary, summary, write_report
from .signals import signals_deferred

log = logging.getLogger("flora.sim")
FEDERATION = "sim"
Say = Callable[[str], None]

METHODS = {
    "zero_shot": "the bundle's initial adapter (round 0, before any training) on the held-out test split",
    "federated": "FedAvg of the agents' LoRA updates, weighted by sample count; each agent trains on its shard "
                 "less the validation images it holds out (--val-fraction, edge.dataset.train_val_split with its "
                 "client seed); the global adapter is tested on the held-out test split after every round",
    "centralised": "one LoRA adapter trained on the union of the agents' training splits (exactly the images the "
                   "agents train on), --epochs epochs per round from the initial adapter, tested after every round "
                   "(equal epochs: about as many steps a round as all clients together)",
    "centralised_equal_steps": "the same, but S optimizer steps per round, S = round(sum_k n_k s_k / sum_k n_k) with "
                               "s_k client k's steps in a round: the sequential steps of the federated model "
                               "(equal steps)",
    "local_only": "each client trains its own LoRA adapter on its training split alone, never aggregated, "
                  "--epochs epochs per round; the value per round is the unweighted mean over clients of each "
                  "local model's accuracy on the shared held-out test split (per client: local_only_per_client)",
}


@dataclass
class SimConfig:
    model: str = "clip-proxy"
    clients: int = 4
    rounds: int = 10
    partition: str = "iid"
    dataset: str = "digits"
    out: Path = Path("runs/sim")
    shots: Optional[int] = None
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    compare: bool = False
    backend: str = "auto"
    fp16_updates: bool = False
    image_encoder_int8: bool = False  # agents compute image features with the bundle's int8 encoder
    bundle: Optional[Path] = None
    val_fraction: float = 0.1
    round_timeout: float = 120.0
    timeout: float = 1800.0
    random_init: bool = False
    http: Optional[str] = None  # the aggregator's dashboard address, if any
    lora_variant: str = "lora"  # "ffa": export FFA-LoRA (A frozen, B alone trained and sent)
    dp_clip: Optional[float] = None  # differential privacy: the clip norm (turns DP on)
    dp_noise_multiplier: Optional[float] = None
    dp_epsilon: Optional[float] = None  # calibrate the noise multiplier to this epsilon over the run's rounds
    dp_delta: float = 1e-5
    dp_max_epsilon: Optional[float] = None
    dp_accountant: str = "pld"
    dp_mode: str = "central"
    malicious: int = 0  # clients that attack (seeded), with `attack`
    attack: Optional[str] = None  # sign-flip[:X], scale:X, noise[:S], label-flip (sim/attacks.py)
    processes: Optional[int] = None  # agent processes; fewer than clients: virtual clients share a step session
    mode: str = "sync"  # async: buffered asynchronous rounds, reported side by side with a sync run
    buffer: Optional[int] = None  # async: updates per version (default: clients - 1)
    max_staleness: int = 10
    staleness: str = "sqrt"
    server_lr: float = 1.0
    straggler_factor: float = 1.0  # the last client takes this many times as long per round
    pretrained: Optional[str] = None  # a checkpoint file (flora-export --pretrained); presets have their own
    data_seed: Optional[int] = None  # test split, partition, validation splits (default: seed)
    seeds: int = 1  # runs with seeds seed+i and data_seed+i, reported as mean +- sd
    lr_schedule: str = "constant"
    reset_optimizer: bool = False
    until_plateau: bool = False  # stop once federated accuracy plateaus; --rounds is the upper bound
    plateau_window: int = 10
    plot_x: str = "rounds"  # or "steps": sequential optimizer steps
    strategy: str = "fedavg"
    strategy_options: Tuple[str, ...] = ()  # KEY=VALUE, as flora-aggregator --strategy-option
    recipe: Optional[str] = None  # flora-export --recipe for the bundle (flora.export.recipes); None: the defaults
    loss: Optional[str] = None  # flora-export --loss (None: the recipe's, or ce)

    @property
    def effective_loss(self) -> str:
        if self.loss is not None:
            return self.loss
        if self.recipe is not None:
            from flora.export.recipes import get_recipe

            return str(get_recipe(self.recipe).export["loss"])
        return "ce"

    @property
    def step_only(self) -> bool:
        """Whether only the step graph computes this run's optimizer (Adam with L2 weight decay)."""
        if self.recipe is None:
            return False
        from flora.export.recipes import get_recipe

        export = get_recipe(self.recipe).export
        return export["optimizer"] == "adam" and export["weight_decay"] != 0

    @property
    def hosted(self) -> bool:
        """Several clients per agent process (`--processes` below `--clients`)."""
        return self.processes is not None and self.processes < self.clients

    @property
    def async_buffer(self) -> int:
        return self.buffer if self.buffer is not None else max(1, self.clients - 1)

    @property
    def async_versions(self) -> int:
        """Versions an async run publishes: as many updates in all as the sync run's rounds take."""
        return -(-self.rounds * self.clients // self.async_buffer)
    secure_aggregation: bool = False  # enroll every agent, per-device TLS certificates, SecAgg+ rounds
    shares: Optional[int] = None  # secure aggregation's k and t (None: the aggregator's defaults)
    threshold: Optional[int] = None

    @property
    def split_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed


class SimError(FloraError, RuntimeError):
    pass


# -- data ----------------------------------------------------------------------------------------
def prepare_data(cfg: SimConfig) -> SplitDataset:
    if cfg.dataset == "digits":
        return write_digits(cfg.out / "data" / "digits", seed=cfg.split_seed)
    path = Path(cfg.dataset)
    if not path.is_dir():
        raise SimError(f"dataset {cfg.dataset!r} is neither 'digits' nor an image folder")
    return load_folder_dataset(path, seed=cfg.split_seed)


def write_csv(path: Path, samples: Sequence[Sample], classes: Sequence[str]) -> None:
    """`path,label` rows (absolute image path, class name), quoted where needed (commas, quotes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows([str(s.path.resolve()), classes[s.label]] for s in samples)


def shard(cfg: SimConfig, data: SplitDataset) -> List[List[Sample]]:
    parse_scheme(cfg.partition)
    parts = partition(data.train_labels, cfg.clients, cfg.partition, cfg.split_seed)
    shards = [[data.train[i] for i in p] for p in parts]
    if cfg.shots:
        from flora.edge.dataset import few_shot

        shards = [few_shot(s, cfg.shots, cfg.split_seed + i) for i, s in enumerate(shards)]
    return shards


# -- the bundle ----------------------------------------------------------------------------------
def needed_backends(backend: str, step_only: bool = False) -> Tuple[str, ...]:
    """The trainer backends a bundle exported for this run holds: the one asked for; for auto, what runs here
    (`step_only`: the run's loss or optimizer is one only the step graph computes)."""
    if backend != "auto":
        return (backend,)
    if step_only:
        return ("step",)
    from flora.edge.ort import has_training_api

    return ("ort-training",) if has_training_api() else ("step",)


def backend_mismatch(bundle: Bundle, backend: str) -> Optional[str]:
    """Why `bundle` cannot train with `backend` on this machine, or None."""
    usable = available_backends(bundle)
    if backend == "auto" and not usable:
        return f"it holds backends {list(bundle.manifest.backends)}, none of which runs here"
    if backend != "auto" and not bundle.has(backend):
        return f"it holds backends {list(bundle.manifest.backends)}, not {backend}"
    return None


def export_mismatch(bundle: Bundle, cfg: SimConfig, classes: Sequence[str]) -> Optional[str]:
    """Why the sim's own earlier export does not fit this run (model, classes, backend, weights, seed), or None."""
    from flora.export.presets import get_preset

    m = bundle.manifest
    want_random = not cfg.pretrained and (cfg.random_init or get_preset(cfg.model).default_pretrained is None)
    is_random = m.pretrained.get("source") == "random-init"
    checks = [
        (m.preset == cfg.model, f"it is {m.preset}, not {cfg.model}"),
        (list(m.classes) == list(classes), "its classes differ from the data's"),
        (is_random == want_random, "its weights are " + ("random" if is_random else "pretrained")),
        (is_random or weights_current(bundle, cfg), "its weights file is another or has changed since"),
        (m.created.get("lora_init_seed") == cfg.seed and (not is_random or m.pretrained.get("seed") == cfg.seed),
         f"it was exported with another seed than {cfg.seed}"),
        (not cfg.image_encoder_int8 or IMAGE_ENCODER_INT8 in m.files, "it has no int8 image encoder"),
        (m.lora.variant == cfg.lora_variant, f"its LoRA variant is {m.lora.variant}, not {cfg.lora_variant}"),
        ((m.recipe or {}).get("name") == cfg.recipe, f"it was exported with another recipe than {cfg.recipe}"),
        (m.loss == cfg.effective_loss, f"its loss is {m.loss}, not {cfg.effective_loss}"),
    ]
    reasons = [why for ok, why in checks if not ok]
    return "; ".join(reasons) or backend_mismatch(bundle, cfg.backend)


def weights_file(cfg: SimConfig) -> Optional[Path]:
    """The checkpoint file this run's export loads: --pretrained, or the clip-proxy preset's cached file."""
    from flora.export.presets import PROXY_TAG, get_preset

    if cfg.random_init:
        return None
    if cfg.pretrained:
        return Path(cfg.pretrained).expanduser().resolve()
    if get_preset(cfg.model).default_pretrained == PROXY_TAG:
        from flora.export import proxy

        return proxy.default_dir() / proxy.CHECKPOINT
    return None


def weights_current(bundle: Bundle, cfg: SimConfig) -> bool:
    """Whether the bundle was exported from this run's weights file as it is now (same name, written after it)."""
    path = weights_file(cfg)
    if path is None:
        return True  # an open_clip tag: the cache names it
    recorded = bundle.manifest.pretrained.get("file")
    try:
        return (recorded is not None and Path(recorded).name == path.name
                and (bundle.root / "manifest.json").stat().st_mtime >= path.stat().st_mtime)
    except OSError:
        return False


def ensure_proxy(cfg: SimConfig, say: Say) -> None:
    """The clip-proxy preset's checkpoint, pre-trained now if it was never made (scripts/setup.sh makes it)."""
    from flora.export.presets import PROXY_TAG, get_preset

    if cfg.random_init or cfg.pretrained or get_preset(cfg.model).default_pretrained != PROXY_TAG:
        return
    from flora.export import proxy

    if not (proxy.default_dir() / proxy.CHECKPOINT).is_file():
        say(f"pre-training the offline proxy CLIP once into {proxy.default_dir()} (flora-proxy; about two minutes "
            "on 2 cores)")
        proxy.build(proxy.default_dir(), say=lambda m: say(f"  {m}"))


def given_bundle(cfg: SimConfig, classes: Sequence[str]) -> Bundle:
    """--bundle: used as it is, after checking it fits the data and the backend."""
    assert cfg.bundle is not None
    bundle = load_bundle(cfg.bundle)
    if list(bundle.manifest.classes) != list(classes):
        raise SimError(f"bundle {cfg.bundle} has classes {list(bundle.manifest.classes)}, the data has {classes}")
    why = backend_mismatch(bundle, cfg.backend)
    if why:
        raise SimError(f"bundle {cfg.bundle} cannot train with --backend {cfg.backend}: {why}; export it with "
                       f"flora-export --backend {'step' if cfg.backend == 'step' else 'all'}, or leave out --bundle")
    return bundle


def prepare_bundle(cfg: SimConfig, classes: List[str], say: Say) -> Bundle:
    """The given bundle, the one a previous run exported for this run's settings, or a fresh export."""
    if cfg.bundle is not None:
        return given_bundle(cfg, classes)
    target = cfg.out / "bundle"
    try:
        why = export_mismatch(load_bundle(target), cfg, classes)
        if why is None:
            say(f"reusing the bundle in {target}")
            return load_bundle(target)
        say(f"the bundle in {target} does not fit this run ({why}): exporting again")
    except BundleError:
        pass
    return export(cfg, classes, target, say)


def export(cfg: SimConfig, classes: List[str], target: Path, say: Say) -> Bundle:
    from flora.export.loading import WeightsError
    from flora.export.pipeline import ExportError, ExportOptions, export_bundle

    ensure_proxy(cfg, say)
    settings = export_training_settings(cfg)
    backends = settings["backends"]
    say(f"exporting {cfg.model} for {len(classes)} classes ({', '.join(backends)}"
        f"{f', recipe {cfg.recipe}' if cfg.recipe else ''}) into {target}")
    try:
        export_bundle(ExportOptions(preset=cfg.model, classes=classes, out=target, force=True,
                                    random_init=cfg.random_init, seed=cfg.seed, pretrained=cfg.pretrained,
                                    image_encoder_int8=cfg.image_encoder_int8, **settings), say=lambda m: say(f"  {m}"))
    except (ExportError, WeightsError) as exc:
        raise SimError(f"cannot export {cfg.model}: {exc}") from exc
    return load_bundle(target)


def export_training_settings(cfg: SimConfig) -> Dict[str, Any]:
    """The ExportOptions this run's recipe, loss and backend give: backends, loss, and with --recipe the
    recipe's LoRA and optimizer settings and its record (the round settings it was run with counted as
    overrides where they differ from the recipe's)."""
    backends = needed_backends(cfg.backend, cfg.step_only)
    if cfg.recipe is None:
        return {"backends": backends, "loss": cfg.effective_loss, "lora_variant": cfg.lora_variant}
    from flora.export.recipes import export_settings

    given: Dict[str, Any] = {"backends": backends} if cfg.loss is None else {"backends": backends, "loss": cfg.loss}
    if cfg.lora_variant != "lora":  # --lora-variant ffa on top of a recipe
        given["lora_variant"] = cfg.lora_variant
    return export_settings(cfg.recipe, given, {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
                                               "reset_optimizer": cfg.reset_optimizer})


# -- the live table ------------------------------------------------------------------------------
class Table:
    HEADER = (f"{'round':>5} {'clients':>8} {'test acc':>9} {'test loss':>10} {'MB up':>8} {'MB down':>8} "
              f"{'round s':>8} {'elapsed s':>10}")

    def __init__(self, say: Say) -> None:
        self.say = say
        self.say(self.HEADER)
        self.say("-" * len(self.HEADER))

    def zero_shot(self, acc: Optional[float], loss: Optional[float], elapsed: float) -> None:
        self.say(f"{0:>5} {'-':>8} {_f(acc):>9} {_f(loss):>10} {'-':>8} {'-':>8} {'-':>8} {elapsed:>10.1f}")

    def row(self, r: Dict, elapsed: float) -> None:
        eps = epsilon_of(r)
        self.say(f"{r['round'] + 1:>5} {r['num_reported']:>4}/{r['num_asked']:<3} {_f(r.get('test_accuracy')):>9} "
                 f"{_f(r.get('test_loss')):>10} {r['bytes_received'] / 1e6:>8.3f} {r['bytes_sent'] / 1e6:>8.3f} "
                 f"{r['wall_time_s']:>8.1f} {elapsed:>10.1f}" + (f"  epsilon {eps:.4g}" if eps is not None else ""))


def _f(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


# -- the run -------------------------------------------------------------------------------------
def effective_backend(cfg: SimConfig) -> str:
    """The agents' backend: virtual clients sharing a session need `step` (its weights and moments are inputs)."""
    if not cfg.hosted:
        return cfg.backend
    if cfg.backend == "ort-training":
        raise SimError("--processes below --clients needs the step backend (its weights and AdamW moments are inputs "
                       "a client can swap); ort-training keeps them inside its session")
    return "step"


def check_config(cfg: SimConfig) -> None:
    """Everything that can be refused before any data is written or any bundle exported (SimError,
    PartitionError, UnknownPresetError)."""
    if cfg.backend == "ort-training" and cfg.step_only and cfg.bundle is None:
        raise SimError(f"--backend ort-training cannot train recipe {cfg.recipe}: its Adam with L2 weight decay "
                       "is computed by the step graph only (the ort-training optimizer is AdamW); use --backend step "
                       "or auto")
    parse_scheme(cfg.partition)
    for option, value in (("clients", cfg.clients), ("rounds", cfg.rounds), ("epochs", cfg.epochs),
                          ("batch-size", cfg.batch_size), ("shots", 1 if cfg.shots is None else cfg.shots)):
        if value < 1:
            raise SimError(f"--{option} must be >= 1, got {value}")
    for option, value in (("lr", cfg.lr), ("round-timeout", cfg.round_timeout), ("timeout", cfg.timeout)):
        if not value > 0:
            raise SimError(f"--{option} must be > 0, got {value}")
    if not 0 <= cfg.val_fraction < 1:
        raise SimError(f"--val-fraction must be >= 0 and < 1, got {cfg.val_fraction}")
    if cfg.backend not in ("auto", *TRAINERS):
        raise SimError(f"--backend must be auto or one of {list(TRAINERS)}, got {cfg.backend!r}")
    if cfg.bundle is None:
        from flora.export.presets import get_preset  # no torch

        get_preset(cfg.model)
    elif not Path(cfg.bundle).is_dir():
        raise SimError(f"--bundle {cfg.bundle} is not a folder")
    if cfg.processes is not None and cfg.processes < 1:
        raise SimError(f"--processes must be >= 1, got {cfg.processes}")
    if cfg.seeds < 1:
        raise SimError(f"--seeds must be >= 1, got {cfg.seeds}")
    if cfg.seeds > 1 and cfg.mode == "async":
        raise SimError("--seeds above 1 runs sync federations only; drop --mode async or --seeds")
    if cfg.mode not in ("sync", "async"):
        raise SimError(f"--mode must be sync or async, got {cfg.mode!r}")
    if cfg.straggler_factor < 1:
        raise SimError(f"--straggler-factor must be >= 1, got {cfg.straggler_factor}")
    if cfg.malicious and cfg.hosted:
        raise SimError("--malicious runs each attacker as its own agent process: give --processes >= --clients")
    if cfg.dp_clip is not None and cfg.mode != "sync":
        raise SimError("the DP options need --mode sync (the accountant charges each round's sampling)")
    if cfg.dp_clip is not None and cfg.secure_aggregation and cfg.dp_mode != "distributed":
        raise SimError("the DP options with --secure-aggregation need --dp-mode distributed (the devices add the "
                       "noise under the mask; docs/privacy.md)")
    if cfg.mode == "async":
        from flora.broker.fedbuff import BufferConfig, Staleness  # no torch, no MQTT

        try:
            BufferConfig(cfg.async_buffer, cfg.max_staleness, Staleness.parse(cfg.staleness), cfg.server_lr)
        except ValueError as exc:
            raise SimError(str(exc)) from None
    if (cfg.shares is not None or cfg.threshold is not None) and not cfg.secure_aggregation:
        raise SimError("--shares and --threshold are secure aggregation's: give --secure-aggregation too")
    if cfg.secure_aggregation:
        from flora.broker.secure_round import SecureSettings  # ParamsError/ConfigError for unsound k and t

        SecureSettings(cfg.shares, cfg.threshold)
        if cfg.mode != "sync":
            raise SimError("--secure-aggregation runs synchronous rounds: not with --mode async")
        if cfg.clients < 3:
            raise SimError(f"--secure-aggregation needs at least 3 clients (a sum of fewer shows too much), got "
                           f"{cfg.clients}")
    effective_backend(cfg)


def run(cfg: SimConfig, say: Say = print) -> Dict:
    """One federation (or `cfg.seeds` of them, each in OUT/seed-<k>), reported; with --compare, baselines too."""
    check_config(cfg)
    if cfg.seeds == 1:
        return run_one(cfg, say)
    reports = []
    for k in range(cfg.seeds):
        one = replace(cfg, seeds=1, seed=cfg.seed + k, data_seed=cfg.split_seed + k, out=cfg.out / f"seed-{k}")
        say(f"== seed {k + 1} of {cfg.seeds}: model seed {one.seed}, data seed {one.split_seed} ({one.out})")
        reports.append(run_one(one, say))
    agg = seeds_report(reports, cfg.out)
    (cfg.out / "report.json").write_text(json.dumps(agg, indent=2) + "\n")
    say(seeds_summary(agg))
    return agg


def run_one(cfg: SimConfig, say: Say = print) -> Dict:
    """Federate, report, then (with --compare) add the baselines to the report already written. With --mode
    async a synchronous run comes first, and the report compares their time to the sync run's accuracy."""
    t_start = time.monotonic()
    cfg = replace(cfg, backend=effective_backend(cfg))
    threats = Threats(cfg)  # attack, attackers, DP noise: checked before anything runs
    cfg.out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg)
    bundle = prepare_bundle(cfg, data.classes, say)
    shards = shard(cfg, data)
    hist = np.stack([np.bincount([s.label for s in sh], minlength=len(data.classes)) for sh in shards])
    for i, sh in enumerate(shards):
        write_csv(client_dir(cfg, i) / "data.csv", sh, threats.label_names(i, data.classes))
    write_csv(cfg.out / "test.csv", data.test, data.classes)
    say(f"{data.name}: {len(data.train)} training images in {cfg.clients} shards ({cfg.partition}, label skew "
        f"{histogram_skew(hist):.3f}; sizes {[len(s) for s in shards]}), {len(data.test)} held-out test images")
    if threats.attackers:
        say(f"attack {threats.attack.describe} by {', '.join(f'client-{i}' for i in threats.attackers)}")
    if cfg.dp_clip is not None:
        say(f"differential privacy: clip {cfg.dp_clip:g}, noise multiplier {threats.noise_multiplier:.4g}"
            + (f" (for epsilon {cfg.dp_epsilon:g} after {cfg.rounds} rounds)" if cfg.dp_epsilon is not None else ""))
    modes = {}
    if cfg.mode == "async":
        say(f"sync rounds first ({cfg.rounds} rounds of {cfg.clients} clients), for comparison")
        modes["sync"] = federate(cfg, bundle, time.monotonic(), say, mode="sync", tag="-sync", threats=threats)
        say(f"async: buffer {cfg.async_buffer}, {cfg.async_versions} versions, staleness {cfg.staleness} up to "
            f"{cfg.max_staleness}, server lr {cfg.server_lr}")
    rows, initial = modes[cfg.mode] = federate(cfg, bundle, time.monotonic() if modes else t_start, say,
                                               mode=cfg.mode, threats=threats)
    report = build_report(cfg, data, bundle, shards, hist, rows, initial)
    report["threats"] = threats.report()
    report["federated_seconds"] = round(time.monotonic() - t_start, 1)
    if cfg.mode == "async":
        report["modes"] = compare_modes(modes)
    write_report(cfg.out, report, say, cfg.plot_x)
    if cfg.compare:
        add_baselines(cfg, bundle, shards, data, report, say)
    say(summary(report))
    return report


def client_dir(cfg: SimConfig, i: int) -> Path:
    return cfg.out / "clients" / f"client-{i}"


def federate(cfg: SimConfig, bundle: Bundle, t_start: float, say: Say, mode: str = "sync",
             tag: str = "", threats: Optional[Threats] = None) -> Tuple[List[Dict], Dict]:
    """Run the broker, the aggregator and the agents to the end; every one is stopped on every way out."""
    state_dir = cfg.out / f"aggregator{tag}"
    for stale in (state_dir, *(client_dir(cfg, i) / "state" for i in range(cfg.clients))):
        if stale.exists():
            shutil.rmtree(stale)  # a new run, not a resume
    if cfg.secure_aggregation:
        enroll(cfg, state_dir, say)
    group = ProcessGroup(cfg.out / f"logs{tag}")
    broker: Optional[Mosquitto] = None
    try:
        with signals_deferred():  # a Ctrl-C while mosquitto starts up is held until `broker` is set
            sizes = dict(clients=max(cfg.clients, 1),
                         max_update_bytes=adapter.max_blob_bytes(bundle.manifest.trainable))
            broker = (start_mosquitto(cfg.out / f"mosquitto{tag}", listener_config=certificate_listener(state_dir),
                                      **sizes)
                      if cfg.secure_aggregation else start_mosquitto(cfg.out / f"mosquitto{tag}", **sizes))
        group.env.update(broker.env)  # the generated credentials reach the children in their environment only
        url = f"mqtts://{broker.host}:{broker.port}" if cfg.secure_aggregation else broker.url
        say(f"mosquitto on {url}; logs in {cfg.out / f'logs{tag}'}"
            + (" (per-device certificates, the enrollment ACL)" if cfg.secure_aggregation else "")
            + (f"; dashboard on http://{cfg.http}/" if cfg.http else ""))
        threats = threats or Threats(cfg)
        group.start("aggregator", "flora.broker.cli",
                    aggregator_args(cfg, bundle, url, mode, state_dir) + threats.aggregator_args())
        agents = start_agents(cfg, bundle, url, group, cfg.out / f"logs{tag}", threats)
        rows = watch(cfg, state_dir, group, t_start, say)
        if not group.wait(agents, timeout=60):
            raise SimError("the agents did not exit after the federation finished")
    finally:
        teardown(group, broker)
    state = json.loads((state_dir / STATE).read_text())
    return rows, state.get("extra", {}).get("initial_eval", {})


def identity_dir(cfg: SimConfig, i: int) -> Path:
    return client_dir(cfg, i) / "identity"


def enroll(cfg: SimConfig, state_dir: Path, say: Say) -> None:
    """--secure-aggregation: the federation's CA and keys in the aggregator's state dir, and every simulated
    device enrolled as a real one is (`flora-aggregator enroll`): its identity, TLS certificate and ACL entry."""
    pki = FederationPKI(state_dir, FEDERATION)
    pki.ensure(("localhost", "127.0.0.1"))
    for i in range(cfg.clients):
        pki.enroll(f"client-{i}", identity_dir(cfg, i))
    say(f"enrolled {cfg.clients} devices in federation {FEDERATION!r} ({state_dir / 'pki'})")


def teardown(group: ProcessGroup, broker: Optional[Mosquitto]) -> None:
    """Stop the children, then the broker; signals wait until both are done."""
    with signals_deferred():
        try:
            group.stop()
        finally:
            if broker is not None:
                broker.stop()


def aggregator_args(cfg: SimConfig, bundle: Bundle, url: str, mode: str = "sync",
                    state_dir: Optional[Path] = None) -> List[str]:
    args = ["--bundle", str(bundle.root), "--broker", url, "--federation", FEDERATION,
            "--state-dir", str(state_dir or cfg.out / "aggregator"), "--wait-for-clients", str(cfg.clients),
            "--round-timeout", str(cfg.round_timeout), "--epochs", str(cfg.epochs), "--lr", str(cfg.lr),
            "--weight-decay", repr(bundle.manifest.optimizer.weight_decay),
            "--batch-size", str(cfg.batch_size), "--seed", str(cfg.seed), "--eval-data", str(cfg.out / "test.csv"),
            "--wait-timeout", "300", "--lr-schedule", cfg.lr_schedule, *(["--http", cfg.http] if cfg.http else []),
            *secure_aggregator_args(cfg, state_dir or cfg.out / "aggregator")]
    if cfg.reset_optimizer:
        args.append("--reset-optimizer")
    args += ["--strategy", cfg.strategy]
    if cfg.strategy_options:
        args += ["--strategy-option", *cfg.strategy_options]
    if mode == "async":
        return [*args, "--mode", "async", "--rounds", str(cfg.async_versions), "--min-clients", "1",
                "--buffer", str(cfg.async_buffer), "--max-staleness", str(cfg.max_staleness),
                "--staleness", cfg.staleness, "--server-lr", str(cfg.server_lr)]
    if cfg.until_plateau:
        args += ["--stop-on-plateau", str(cfg.plateau_window)]
    return [*args, "--rounds", str(cfg.rounds), "--min-clients", str(cfg.clients)]


def start_agents(cfg: SimConfig, bundle: Bundle, url: str, group: ProcessGroup, logs: Path,
                 threats: Threats) -> List[Child]:
    """One flora-agent process per client (a poisoned one for a model-poisoning attacker), or (--processes below
    --clients) that many hosts of virtual clients."""
    if not cfg.hosted:
        return [group.start(f"client-{i}", threats.agent(i)[0], threats.agent(i)[1] + agent_args(cfg, bundle, url, i))
                for i in range(cfg.clients)]
    assert cfg.processes is not None
    hosts = []
    for k, part in enumerate(np.array_split(np.arange(cfg.clients), cfg.processes)):
        spec = logs / f"host-{k}-clients.json"
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(json.dumps([agent_args(cfg, bundle, url, int(i)) for i in part]))
        hosts.append(group.start(f"host-{k}", "flora.sim.host", ["--bundle", str(bundle.root),
                                                                  "--clients-file", str(spec)]))
    return hosts


def secure_aggregator_args(cfg: SimConfig, state_dir: Path) -> List[str]:
    if not cfg.secure_aggregation:
        return []
    pki = state_dir / "pki"
    return ["--secure-aggregation", "--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "aggregator-tls.crt"),
            "--tls-key", str(pki / "aggregator-tls.key"),
            *(["--shares", str(cfg.shares)] if cfg.shares is not None else []),
            *(["--threshold", str(cfg.threshold)] if cfg.threshold is not None else [])]


def agent_args(cfg: SimConfig, bundle: Bundle, url: str, i: int) -> List[str]:
    args = ["--bundle", str(bundle.root), "--data", str(client_dir(cfg, i) / "data.csv"), "--broker", url,
            "--client-id", f"client-{i}", "--federation", FEDERATION, "--state-dir", str(client_dir(cfg, i) / "state"),
            "--exit-when-done", "--val-fraction", str(cfg.val_fraction), "--seed", str(client_seed(cfg.seed, i)),
            "--split-seed", str(client_seed(cfg.split_seed, i)), "--backend", cfg.backend, "--threads", "1"]
    if cfg.straggler_factor > 1.0 and i == cfg.clients - 1:
        args += ["--slowdown", str(cfg.straggler_factor)]
    if cfg.secure_aggregation:  # the enrollment folder: TLS login, identity, the aggregator's key
        ids = identity_dir(cfg, i)
        args += ["--identity-dir", str(ids), "--secure-aggregation", "--tls-ca", str(ids / "ca.crt"),
                 "--tls-cert", str(ids / "tls.crt"), "--tls-key", str(ids / "tls.key")]
    return (args + (["--fp16-updates"] if cfg.fp16_updates else [])
            + (["--image-encoder-int8"] if cfg.image_encoder_int8 else []))


def watch(cfg: SimConfig, state_dir: Path, group: ProcessGroup, t_start: float, say: Say) -> List[Dict]:
    """Print a table row for every round the aggregator completes; return the history rows."""
    table = Table(say)
    shown_zero, rows = False, []
    deadline = time.monotonic() + cfg.timeout
    aggregator: Child = group.children[0]
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


# -- the report ----------------------------------------------------------------------------------
ROW_KEYS = ("round", "num_asked", "num_reported", "reported", "samples", "test_accuracy", "test_loss",
            "mean_client_accuracy", "bytes_received", "bytes_sent", "global_bytes", "wall_time_s", "rejection_counts",
            "lr", "strategy", "separate_vs_exact_rel_error", "svd_truncation_rel_error", "dp", "clipped",
            "trimmed_per_side")


def step_counts(cfg: SimConfig, shards: List[List[Sample]], rows: List[Dict]) -> Dict:
    """Optimizer steps a round of each method, from the training split sizes (and what the agents reported)."""
    sizes = [len(s) for s in training_splits(shards, cfg.val_fraction, cfg.split_seed)]
    per_client = {f"client-{i}": steps_per_round(n, cfg.epochs, cfg.batch_size) for i, n in enumerate(sizes)}
    sequential = equal_steps(sizes, cfg.epochs, cfg.batch_size)
    reported = {c: m.get("steps") for c, m in (rows[0].get("metrics") or {}).items()} if rows else {}
    return {
        "per_round": {"federated": sequential, "federated_per_client": per_client,
                      "centralised": steps_per_round(sum(sizes), cfg.epochs, cfg.batch_size),
                      "centralised_equal_steps": sequential, "local_only": per_client},
        "reported_by_agents": reported,
        "rule": "federated: S = round(sum_k n_k s_k / sum_k n_k), the sequential steps of the FedAvg model, with "
                "s_k = epochs * ceil(n_k / batch) client k's steps; centralised (equal epochs): epochs * "
                "ceil(N / batch) on the union; centralised_equal_steps: S",
    }


def build_report(cfg: SimConfig, data: SplitDataset, bundle: Bundle, shards: List[List[Sample]], hist: np.ndarray,
                 rows: List[Dict], initial: Dict) -> Dict:
    """The federated run's report; `accuracy[m][0]` is round 0 (before training), `[r]` after round r."""
    kind, _ = parse_scheme(cfg.partition)
    accuracy = {"federated": [initial.get("test_accuracy")] + [r.get("test_accuracy") for r in rows],
                "zero_shot": initial.get("test_accuracy")}
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "seeds": {"model": cfg.seed, "data": cfg.split_seed},
        "dataset": {"name": data.name, "classes": data.classes, "train": len(data.train), "test": len(data.test)},
        "partition": {"scheme": cfg.partition, "kind": kind, "non_iid": kind != "iid",
                      "few_shot": cfg.shots is not None, "shots": cfg.shots, "label_skew": histogram_skew(hist),
                      "client_sizes": [len(s) for s in shards], "label_histogram": hist.tolist()},
        "bundle": {"path": str(bundle.root), "model_id": bundle.manifest.model_id, "preset": bundle.manifest.preset,
                   "backends": list(bundle.manifest.backends), "lora": asdict(bundle.manifest.lora),
                   "weights": bundle.manifest.pretrained},
        "methods": {k: METHODS[k] for k in ("zero_shot", "federated")},
        "accuracy": accuracy,
        "comparison": comparison(accuracy),
        "steps": step_counts(cfg, shards, rows),
        "lr_per_round": [r.get("lr") for r in rows],
        "stopped": next((r["stopped"] for r in rows if r.get("stopped")), None),
        "epsilon": [epsilon_of(r) for r in rows] if any(epsilon_of(r) is not None for r in rows) else None,
        "rounds": [{k: r.get(k) for k in ROW_KEYS} for r in rows],
        "bytes": {"up_per_round": [r["bytes_received"] for r in rows],
                  "down_per_round": [r["bytes_sent"] for r in rows]},
        "out": str(cfg.out),
    }


def add_baselines(cfg: SimConfig, bundle: Bundle, shards: List[List[Sample]], data: SplitDataset, report: Dict,
                  say: Say) -> None:
    """Train the baselines and rewrite the report with them; if they fail the federated report stays."""
    t0 = time.monotonic()
    rounds = len(report["accuracy"]["federated"]) - 1  # fewer than --rounds if the federation plateaued
    try:
        accuracy, info = compare(cfg, bundle, shards, data, rounds, say)
    except Exception as exc:  # any failure here must leave the federated report in place
        report["baselines_error"] = f"{type(exc).__name__}: {exc}"
        write_report(cfg.out, report, say, cfg.plot_x)
        raise SimError(f"the baselines failed ({exc}); the federated report is in {cfg.out / 'report.json'}") from exc
    report["accuracy"].update(accuracy)
    report["methods"] = dict(METHODS)
    report["comparison"] = comparison(report["accuracy"])
    report["baselines"] = {**info, "seconds": round(time.monotonic() - t0, 1)}
    write_report(cfg.out, report, say, cfg.plot_x)


def baseline_inputs(cfg: SimConfig, bundle: Bundle, splits: List[List[Sample]],
                    test: List[Sample]) -> Tuple[List[LocalData], LocalData]:
    """LocalData for each client's training split and the test split: cached features, or image paths."""
    parts = [*splits, test]
    if not bundle.manifest.needs_image_encoder:  # LoRA in the image tower: pixels decoded per batch
        local = [LocalData(_labels(p), paths=[s.path for s in p], preprocess=bundle.manifest.preprocess)
                 for p in parts]
        return local[:-1], local[-1]
    cache = FeatureCache(cfg.out / "features.sqlite")
    try:
        feats = image_features(bundle, [s.path for p in parts for s in p], cache)
    finally:
        cache.close()
    ends = np.cumsum([len(p) for p in parts])[:-1]
    local = [LocalData(_labels(p), features=f) for p, f in zip(parts, np.split(feats, ends))]
    return local[:-1], local[-1]


def _labels(samples: Sequence[Sample]) -> np.ndarray:
    return np.array([s.label for s in samples], dtype=np.int64)


def compare(cfg: SimConfig, bundle: Bundle, shards: List[List[Sample]], data: SplitDataset, rounds: int,
            say: Say) -> Tuple[Dict, Dict]:
    """Centralised (equal epochs and equal steps) and local-only curves on the agents' training splits, for
    `rounds` rounds at the federation's per-round lr, and which data they used."""
    from . import baselines

    splits = training_splits(shards, cfg.val_fraction, cfg.split_seed)
    train, test = baseline_inputs(cfg, bundle, splits, data.test)
    schedule = baselines.Schedule(rounds=rounds, total_rounds=cfg.rounds, epochs=cfg.epochs, lr=cfg.lr,
                                  batch_size=cfg.batch_size, lr_schedule=cfg.lr_schedule,
                                  reset_optimizer=cfg.reset_optimizer, backend=cfg.backend)
    sizes = [len(s) for s in splits]
    s_eq = equal_steps(sizes, cfg.epochs, cfg.batch_size)
    say(f"baselines: centralised LoRA on the union of the agents' training splits ({sum(sizes)} images; "
        f"{steps_per_round(sum(sizes), cfg.epochs, cfg.batch_size)} steps a round at equal epochs, {s_eq} at equal "
        f"steps), local-only LoRA on each split ({sizes})")
    central = baselines.centralised(bundle, train, test, schedule, cfg.seed)
    central_steps = baselines.centralised(bundle, train, test, schedule, cfg.seed, steps=s_eq)
    per_client = baselines.local_only(bundle, train, test, schedule, cfg.seed)
    accuracy = {"centralised": [None, *central], "centralised_equal_steps": [None, *central_steps],
                "local_only": [None, *baselines.mean_curve(per_client)],
                "local_only_per_client": {c: [None, *v] for c, v in per_client.items()}}
    info = {"train_images": {"centralised": sum(sizes),
                             "local_only": {f"client-{i}": n for i, n in enumerate(sizes)}},
            "val_fraction": cfg.val_fraction}
    return accuracy, info


def time_to_accuracy(rows: List[Dict], target: Optional[float]) -> Optional[float]:
    """Seconds from the first round's start until a global first reached `target` test accuracy (None: never)."""
    if target is None or not rows:
        return None
    for r in rows:
        acc = r.get("test_accuracy")
        if isinstance(acc, (int, float)) and acc >= target - 1e-12:
            return round(r["closed_at"] - rows[0]["started_at"], 2)
    return None


def compare_modes(modes: Dict[str, Tuple[List[Dict], Dict]]) -> Dict:
    """Sync and async side by side: accuracy against time, and each one's time to the sync run's final accuracy."""
    sync_rows = modes["sync"][0]
    target = sync_rows[-1].get("test_accuracy") if sync_rows else None
    out: Dict = {"target_accuracy": target, "target": "the sync run's final held-out test accuracy"}
    for name, (rows, _) in modes.items():
        t0 = rows[0]["started_at"] if rows else 0.0
        out[name] = {"globals": len(rows), "final_accuracy": rows[-1].get("test_accuracy") if rows else None,
                     "seconds": round(rows[-1]["closed_at"] - t0, 2) if rows else None,
                     "time_to_target_s": time_to_accuracy(rows, target),
                     "curve": [[round(r["closed_at"] - t0, 2), r.get("test_accuracy")] for r in rows],
                     "rejection_counts": _sum_counts(rows)}
        if name == "async":
            out[name]["staleness"] = [r.get("staleness", {}).get("mean") for r in rows]
    return out


def _sum_counts(rows: List[Dict]) -> Dict[str, int]:
    total: Dict[str, int] = {}
    for r in rows:
        for reason, n in r.get("rejection_counts", {}).items():
            total[reason] = total.get(reason, 0) + n
    return dict(sorted(total.items()))

