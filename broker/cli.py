"""`flora-aggregator`: run a federation (`run`, the default), show its state (`status`), plot it (`plot`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import List, Optional

from edge.config import ConfigError, load_toml, merge_config

RUN_KEYS = (
    "bundle", "manifest", "initial_adapter", "broker", "federation", "rounds", "state_dir", "epochs", "lr",
    "batch_size", "weight_decay", "clients_per_round", "fraction", "min_clients", "round_timeout",
    "wait_for_clients", "wait_timeout", "seed", "strategy", "max_update_bytes", "eval_data", "client_id",
    "username", "password", "tls_ca", "tls_cert", "tls_key", "log_level",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flora-aggregator", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the federation (the default command)")
    run.add_argument("--config", type=Path, help="TOML file with the same keys as these options")
    run.add_argument("--bundle", type=Path, help="bundle folder (its manifest and initial adapter)")
    run.add_argument("--manifest", type=Path, help="a manifest.json instead of the whole bundle")
    run.add_argument("--initial-adapter", type=Path, help="with --manifest: the initial adapter "
                                                          "(default: adapter.safetensors beside the manifest)")
    run.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    run.add_argument("--federation", default="default", help="federation name (topics flora/<name>/...)")
    run.add_argument("--rounds", type=int, default=10)
    run.add_argument("--state-dir", type=Path, default=Path("flora-aggregator-state"))
    t = run.add_argument_group("round config sent to clients")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--weight-decay", type=float, default=0.0)
    s = run.add_argument_group("client sampling and quorum")
    s.add_argument("--clients-per-round", type=int, help="ask N of the online clients each round (seeded)")
    s.add_argument("--fraction", type=float, help="ask this fraction of the online clients each round")
    s.add_argument("--min-clients", type=int, default=1, help="quorum: updates needed to close at the deadline")
    s.add_argument("--round-timeout", type=float, default=300.0, help="seconds before a round may close on quorum")
    s.add_argument("--wait-for-clients", type=int, default=0, help="clients online before round 0 starts")
    s.add_argument("--wait-timeout", type=float, default=600.0, help="give up waiting for them after this")
    s.add_argument("--seed", type=int, default=0)
    run.add_argument("--strategy", default="fedavg", help="aggregation strategy (default: fedavg)")
    run.add_argument("--max-update-bytes", type=int, help="reject larger updates (default: fp32 size + 64 KiB)")
    run.add_argument("--eval-data", type=Path, help="held-out images (folder or CSV) to test every global on")
    run.add_argument("--client-id", default="flora-aggregator", help="MQTT client id of the aggregator")
    run.add_argument("--username")
    run.add_argument("--password", help="prefer FLORA_MQTT_PASSWORD or the config file")
    run.add_argument("--tls-ca")
    run.add_argument("--tls-cert")
    run.add_argument("--tls-key")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    status = sub.add_parser("status", help="current round and the history of a state dir")
    status.add_argument("--state-dir", type=Path, default=Path("flora-aggregator-state"))
    status.add_argument("--plot", type=Path, help="also write the PNG plot here")
    plot = sub.add_parser("plot", help="PNG of accuracy and bytes per round")
    plot.add_argument("--state-dir", type=Path, default=Path("flora-aggregator-state"))
    plot.add_argument("--out", type=Path, required=True)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "status", "plot", "-h", "--help"):
        argv.insert(0, "run")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "status":
        from .report import print_status

        return print_status(args.state_dir, args.plot)
    if args.command == "plot":
        from .report import write_plot

        return write_plot(args.state_dir, args.out)
    sub = parser._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    try:
        args = merge_config(args, sub, load_toml(args.config), RUN_KEYS)
    except ConfigError as exc:
        print(f"flora-aggregator: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


def _load_inputs(args: argparse.Namespace):
    from edge import adapter
    from edge.bundle import ADAPTER, load_bundle, load_manifest

    if bool(args.bundle) == bool(args.manifest):
        raise ValueError("give exactly one of --bundle and --manifest")
    bundle = None
    if args.bundle:
        bundle = load_bundle(args.bundle, verify=bool(args.eval_data))
        manifest = bundle.manifest
        initial_path = bundle.path(ADAPTER)
    else:
        manifest = load_manifest(args.manifest)
        initial_path = args.initial_adapter or Path(args.manifest).parent / ADAPTER
    initial = adapter.load_file(initial_path, manifest.trainable, model_id=manifest.model_id)
    return bundle, manifest, initial.as_float32()


def run(args: argparse.Namespace) -> int:
    from edge.adapter import AdapterError
    from edge.bundle import BundleError
    from edge.mqtt import BrokerConfigError
    from edge.protocol import ProtocolError, TrainConfig

    from .aggregator import Aggregator, AggregatorConfig
    from .checkpoint import CheckpointError
    from .rounds import Sampling

    if not args.broker:
        print("flora-aggregator: error: missing --broker (on the command line or in --config)", file=sys.stderr)
        return 2
    try:
        bundle, manifest, initial = _load_inputs(args)
        evaluator = None
        if args.eval_data:
            if bundle is None:
                raise ValueError("--eval-data needs --bundle (it runs the bundle's models)")
            from .evaluation import HeldOutEvaluator

            evaluator = HeldOutEvaluator(bundle, args.eval_data)
        cfg = AggregatorConfig(
            manifest=manifest, initial_adapter=initial, broker=args.broker, state_dir=args.state_dir,
            rounds=args.rounds, federation=args.federation,
            train=TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                              weight_decay=args.weight_decay),
            sampling=Sampling(args.clients_per_round, args.fraction, args.min_clients, args.seed),
            round_timeout_s=args.round_timeout, wait_for_clients=args.wait_for_clients,
            wait_timeout_s=args.wait_timeout, strategy=args.strategy, max_update_bytes=args.max_update_bytes,
            evaluator=evaluator, client_id=args.client_id, username=args.username, password=args.password,
            tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
        )
        aggregator = Aggregator(cfg)
    except (BundleError, AdapterError, CheckpointError, BrokerConfigError, ProtocolError, ValueError) as exc:
        print(f"flora-aggregator: error: {exc}", file=sys.stderr)
        return 2

    def _stop(signum, frame):
        logging.getLogger("flora.aggregator").info("signal %d: stopping", signum)
        aggregator.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        return aggregator.run()
    except (ConnectionError, TimeoutError, CheckpointError) as exc:
        print(f"flora-aggregator: error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
