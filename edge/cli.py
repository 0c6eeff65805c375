"""`flora-agent`: the on-device agent (`run`, the default) and its self-test (`doctor`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import List, Optional

from .config import ConfigError, explicit_options, load_toml, merge_config
from .errors import FloraError, report
from .mqtt import BrokerConfig, add_connection_options

PROG = "flora-agent"

RUN_KEYS = (
    "bundle", "data", "broker", "client_id", "federation", "state_dir", "backend", "providers", "threads",
    "shots", "val_fraction", "seed", "fp16_updates", "exit_when_done", "username", "password", "tls_ca",
    "tls_cert", "tls_key", "session_expiry_s", "progress_every_s", "log_level",
)


def _providers(text: str) -> List[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flora-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="join a federation and train rounds (the default command)")
    run.add_argument("--config", type=Path, help="TOML file with the same keys as these options")
    run.add_argument("--bundle", type=Path, help="bundle folder written by flora-export")
    run.add_argument("--data", type=Path, help="image folder (one subfolder per class) or a path,label CSV")
    add_connection_options(run)
    run.add_argument("--client-id", help="this device's id in the federation (letters, digits, _ - .)")
    run.add_argument("--federation", default="default", help="federation name (topic prefix flora/<name>/)")
    run.add_argument("--state-dir", type=Path, help="where state and the feature cache live "
                                                    "(default ./flora-state/<client-id>)")
    run.add_argument("--backend", default="auto", choices=["auto", "ort-training", "step"],
                     help="trainer backend (default: ort-training where it is installed, else step)")
    run.add_argument("--providers", type=_providers, help="execution providers for step, e.g. cuda,cpu")
    run.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    run.add_argument("--shots", type=int, metavar="K",
                     help="few-shot: train on K images per class (seeded), picked after the --val-fraction "
                          "validation split is taken from all images, so training gets K per class")
    run.add_argument("--val-fraction", type=float, default=0.1, help="local validation split (default %(default)s)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--fp16-updates", action="store_true", help="send updates as float16 (half the bytes)")
    run.add_argument("--exit-when-done", action="store_true", help="exit once the federation announces done")
    run.add_argument("--progress-every-s", type=float, default=5.0, help="seconds between progress lines")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    doctor = sub.add_parser("doctor", help="check this device: runtime, backend, memory, one timed step, broker")
    doctor.add_argument("--config", type=Path, help="agent TOML config (bundle, broker, credentials are read)")
    doctor.add_argument("--bundle", type=Path)
    add_connection_options(doctor, session_expiry=False)
    doctor.add_argument("--federation", help="federation whose retained round gives the batch size "
                                             "(default: the config file's, else 'default')")
    doctor.add_argument("--backend", default="auto", choices=["auto", "ort-training", "step"])
    doctor.add_argument("--providers", type=_providers)
    doctor.add_argument("--threads", type=int)
    doctor.add_argument("--batch-size", type=int, default=32, help="batch size to check (default %(default)s)")
    doctor.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "doctor", "-h", "--help"):
        argv.insert(0, "run")
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    given = explicit_options(sub, argv[1:])  # these win over the config file, whatever their value
    try:
        config = load_toml(args.config)
        if args.command == "doctor":
            config = {k: v for k, v in config.items() if hasattr(args, k)}
            args = merge_config(args, sub, config, vars(args), given)
            if isinstance(args.providers, str):
                args.providers = _providers(args.providers)
            _setup_logging(args.log_level)
            from .doctor import run_doctor

            return run_doctor(args)
        args = merge_config(args, sub, config, RUN_KEYS, given)
    except ConfigError as exc:
        return report(PROG, exc)
    if isinstance(args.providers, str):  # "cuda,cpu" in a config file
        args.providers = _providers(args.providers)
    _setup_logging(args.log_level)
    missing = [k for k in ("bundle", "data", "broker", "client_id") if not getattr(args, k, None)]
    if missing:
        return report(PROG, ConfigError(f"missing {', '.join('--' + m.replace('_', '-') for m in missing)} "
                                        "(on the command line or in --config)"))
    return run_agent(args)


def run_agent(args: argparse.Namespace) -> int:
    from .agent import Agent, AgentConfig

    try:
        cfg = AgentConfig(
            bundle=Path(args.bundle), data=Path(args.data), broker=BrokerConfig.from_args(args),
            client_id=args.client_id, federation=args.federation,
            state_dir=Path(args.state_dir) if args.state_dir else None, backend=args.backend, threads=args.threads,
            providers=args.providers, shots=args.shots, val_fraction=args.val_fraction, seed=args.seed,
            fp16_updates=args.fp16_updates, exit_when_done=args.exit_when_done,
            progress_every_s=args.progress_every_s,
        )
        agent = Agent(cfg)
    except FloraError as exc:
        return report(PROG, exc)

    def _stop(signum, frame):
        logging.getLogger("flora.agent").info("signal %d: stopping", signum)
        agent.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        return agent.run()
    except FloraError as exc:  # ConnectionFailed: 3, which systemd retries; NotAuthorised: 2, which it does not
        return report(PROG, exc)


if __name__ == "__main__":
    sys.exit(main())
