"""`flora-aggregator`: run a federation (`run`, the default), show its state (`status`), plot it (`plot`).

    flora-aggregator --bundle DIR --broker mqtt://HOST:PORT --rounds R --state-dir DIR [options]
    flora-aggregator --config aggregator.toml
    flora-aggregator status --state-dir DIR [--plot FILE.png]
    flora-aggregator plot --state-dir DIR --out FILE.png

A TOML `--config` file takes the same keys as the long options (`round_timeout = 600`); the command
line wins over it. The broker password comes from FLORA_MQTT_PASSWORD (and the username from
FLORA_MQTT_USERNAME) unless given otherwise. Exit status: 0 done or stopped by SIGINT/SIGTERM,
2 bad arguments or inputs, 3 broker or state-dir failure, 4 a round stayed below quorum through
--max-extensions extensions (the round stays open in the state dir; a restart resumes it).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from flora.edge.config import (
    CommandParser,
    ConfigError,
    add_config_option,
    add_version_option,
    apply_config,
    load_toml,
    with_default_command,
)
from flora.edge.errors import EXIT_UNAVAILABLE, FloraError, report
from flora.edge.mqtt import BrokerConfig, add_connection_options

from .validation import DEFAULT_MAX_NUM_SAMPLES

PROG = "flora-aggregator"
DEFAULT_STATE_DIR = Path("flora-aggregator-state")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser() -> CommandParser:
    """The command line; `parser.commands["run"]` holds the options a config file may set."""
    parser = CommandParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_option(parser)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the federation (the default command)", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_option(run)
    run.add_argument("--bundle", type=Path, help="bundle folder (its manifest and initial adapter)")
    run.add_argument("--manifest", type=Path, help="a manifest.json instead of the whole bundle")
    run.add_argument("--initial-adapter", type=Path,
                     help="with --manifest: the initial adapter (default: adapter.safetensors beside the manifest)")
    run.add_argument("--federation", default="default", help="federation name (topics flora/<name>/...)")
    run.add_argument("--rounds", type=int, default=10, help="total rounds to run (default: 10)")
    run.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="checkpoint and history folder")
    t = run.add_argument_group("round config sent to clients (the same every round)")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--weight-decay", type=float, default=0.0)
    s = run.add_argument_group("client sampling and quorum")
    s.add_argument("--clients-per-round", type=int, help="ask N of the online clients each round (seeded)")
    s.add_argument("--fraction", type=float, help="ask this fraction of the online clients each round (seeded)")
    s.add_argument("--min-clients", type=int, default=1, help="quorum: updates needed to close at the deadline")
    s.add_argument("--round-timeout", type=float, default=300.0,
                   help="seconds until a round may close on quorum; below quorum it is extended by this much")
    s.add_argument("--max-extensions", type=int, default=0,
                   help="stop (exit 4, round kept open) after this many extensions below quorum (default 0: no limit)")
    s.add_argument("--wait-for-clients", type=int, default=0, help="clients online before round 0 starts")
    s.add_argument("--wait-timeout", type=float, default=600.0, help="give up waiting for them after this (s)")
    s.add_argument("--metrics-grace", type=float, default=1.0,
                   help="once every asked client reported, wait up to this long (s) for their metrics")
    s.add_argument("--seed", type=int, default=0, help="seed of the client sampling")
    run.add_argument("--strategy", default="fedavg", help="aggregation strategy (default: fedavg)")
    run.add_argument("--max-update-bytes", type=int, help="reject larger updates (default: fp32 size + 64 KiB)")
    run.add_argument("--max-queued-updates", type=int, default=32,
                     help="updates held in memory before the rest wait at the broker (default: 32)")
    run.add_argument("--max-num-samples", type=int, default=DEFAULT_MAX_NUM_SAMPLES,
                     help="reject updates claiming more local samples, as bad-num-samples (default: 10**9)")
    run.add_argument("--eval-data", type=Path, help="held-out images (folder or CSV) to test every global on")
    m = add_connection_options(run.add_argument_group("broker connection"))
    m.add_argument("--client-id", default="flora-aggregator", help="MQTT client id (and, by convention, username)")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    status = sub.add_parser("status", help="current round and the history of a state dir")
    status.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    status.add_argument("--plot", type=Path, help="also write the PNG plot here")
    status.add_argument("--clients", action="store_true",
                        help="also one row per device: state, last seen, backend, samples, last metrics, last error")
    plot = sub.add_parser("plot", help="PNG of accuracy and bytes per round")
    plot.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    plot.add_argument("--out", type=Path, required=True)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = with_default_command(sys.argv[1:] if argv is None else argv, parser, "run")
    args = parser.parse_args(argv)
    if args.command == "status":
        from .report import print_status

        return print_status(args.state_dir, args.plot, clients=args.clients)
    if args.command == "plot":
        from .report import write_plot

        return write_plot(args.state_dir, args.out)
    try:
        args = apply_config(parser.commands["run"], args, argv[1:], load_toml(args.config))
    except ConfigError as exc:
        return report(PROG, exc)
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stdout, format=LOG_FORMAT)
    return run(args)


def _load_inputs(args: argparse.Namespace):
    """(bundle or None, manifest, initial adapter tensors) from --bundle or --manifest."""
    from flora.edge import adapter
    from flora.edge.bundle import ADAPTER, load_bundle, load_manifest

    if bool(args.bundle) == bool(args.manifest):
        raise ConfigError("give exactly one of --bundle and --manifest")
    bundle = None
    if args.bundle:
        bundle = load_bundle(args.bundle, verify=bool(args.eval_data))
        manifest = bundle.manifest
        initial_path = args.initial_adapter or bundle.path(ADAPTER)
    else:
        manifest = load_manifest(args.manifest)
        initial_path = args.initial_adapter or args.manifest.parent / ADAPTER
    initial = adapter.load_file(initial_path, manifest.trainable, model_id=manifest.model_id)
    return bundle, manifest, initial.as_float32()


def _hooks(bundle, eval_data: Optional[Path]) -> Dict[str, Any]:
    """--eval-data: test the initial global and every new one on held-out images (server side)."""
    if not eval_data:
        return {}
    if bundle is None:
        raise ConfigError("--eval-data needs --bundle (it runs the bundle's models)")
    from .evaluation import HeldOutEvaluator

    evaluator = HeldOutEvaluator(bundle, eval_data)
    return {"on_start": evaluator, "on_round_closed": evaluator.on_round_closed}


def run(args: argparse.Namespace) -> int:
    from flora.edge.protocol import TrainConfig

    from .aggregator import Aggregator, AggregatorConfig
    from .rounds import Sampling
    from .strategies import STRATEGIES

    log = logging.getLogger("flora.aggregator")
    if args.strategy not in STRATEGIES:
        return report(PROG, ConfigError(f"unknown --strategy {args.strategy!r}; known: {sorted(STRATEGIES)}"))
    try:
        broker = BrokerConfig.from_args(args)
        bundle, manifest, initial = _load_inputs(args)
        cfg = AggregatorConfig(
            manifest=manifest, initial_adapter=initial, broker=broker, state_dir=args.state_dir,
            rounds=args.rounds, federation=args.federation,
            train=TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                              weight_decay=args.weight_decay),
            sampling=Sampling(args.clients_per_round, args.fraction, args.min_clients, args.seed),
            round_timeout_s=args.round_timeout, wait_for_clients=args.wait_for_clients,
            wait_timeout_s=args.wait_timeout, metrics_grace_s=args.metrics_grace, strategy=args.strategy,
            max_update_bytes=args.max_update_bytes, max_num_samples=args.max_num_samples,
            max_extensions=args.max_extensions, max_queued_updates=args.max_queued_updates,
            client_id=args.client_id, **_hooks(bundle, args.eval_data),
        )
        aggregator = Aggregator.open(cfg)
    except FloraError as exc:
        return report(PROG, exc)
    except OSError as exc:  # e.g. a state dir that cannot be created
        return report(PROG, exc, EXIT_UNAVAILABLE)

    def _stop(signum, frame) -> None:
        log.info("signal %d: stopping after the current step", signum)
        aggregator.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        return aggregator.run()
    except FloraError as exc:  # QuorumError: 4; the broker or the state dir: 3
        log.error("%s", exc)
        return report(PROG, exc)
    except OSError as exc:  # the disk under the state dir (full, read-only), a socket
        log.error("%s", exc)
        return report(PROG, exc, EXIT_UNAVAILABLE)


if __name__ == "__main__":
    sys.exit(main())
