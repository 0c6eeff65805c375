"""`flora-agent`: the on-device agent (`run`, the default), its self-test (`doctor`), and the federation's
model in use: `predict` (classify images) and `evaluate` (accuracy on labelled images)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import List, Optional

from .commands import add_evaluate_parser, add_predict_parser, default_state_dir, run_evaluate, run_predict
from .config import (
    Bounded,
    CommandParser,
    ConfigError,
    add_config_option,
    add_version_option,
    apply_config,
    comma_list,
    config_keys,
    load_toml,
    with_default_command,
)
from .errors import FloraError, report
from .logs import FORMATS, setup_logging
from .mqtt import BrokerConfig, add_connection_options

PROG = "flora-agent"
DOCTOR_DESCRIPTION = ("Can this device run the agent for this bundle? Checks the runtime, the trainer backends, "
                      "the broker, one timed training step and the memory the agent will need; exit 0 if ready.")

COMMANDS = """\
commands:
  run       join a federation and train rounds (the default: `flora-agent [run] OPTIONS`)
  doctor    check this device for a bundle (`flora-agent doctor --help`)
  predict   classify images with the federation's adapter (`flora-agent predict --help`)
  evaluate  accuracy and confusion matrix on labelled images (`flora-agent evaluate --help`)

exit status: 0 done or stopped by SIGINT/SIGTERM, 2 bad arguments, config or inputs (the systemd unit
does not restart on it), 3 the broker cannot be reached (retried)"""

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
BACKENDS = ["auto", "ort-training", "step"]


def build_parser() -> CommandParser:
    parser = CommandParser(prog=PROG, description=__doc__, epilog=COMMANDS,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_option(parser)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="join a federation and train rounds (the default command)",
                         description=__doc__, epilog=COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_option(run)
    run.add_argument("--bundle", type=Path, help="bundle folder written by flora-export")
    run.add_argument("--data", type=Path, help="image folder (one subfolder per class) or a path,label CSV")
    add_connection_options(run)
    run.add_argument("--client-id", help="this device's id in the federation (letters, digits, _ - .)")
    run.add_argument("--federation", default="default", help="federation name (topic prefix flora/<name>/)")
    run.add_argument("--state-dir", type=Path, help="where state and the feature cache live "
                                                    "(default ./flora-state/<client-id>)")
    run.add_argument("--backend", default="auto", choices=BACKENDS,
                     help="trainer backend (default: ort-training where it is installed, else step)")
    run.add_argument("--providers", type=comma_list, help="execution providers for step, e.g. cuda,cpu")
    run.add_argument("--threads", type=Bounded(int, minimum=1), help="ONNX Runtime intra-op threads "
                                                                     "(default: all cores)")
    run.add_argument("--shots", type=Bounded(int, minimum=1), metavar="K",
                     help="few-shot: train on K images per class (seeded), picked after the --val-fraction "
                          "validation split is taken from all images, so training gets K per class")
    run.add_argument("--val-fraction", type=Bounded(float, minimum=0.0, below=1.0), default=0.1,
                     help="local validation split (default %(default)s)")
    run.add_argument("--seed", type=int, default=0, help="seed of the batch order (and of the splits, unless "
                                                            "--split-seed) (default %(default)s)")
    run.add_argument("--split-seed", type=int,
                     help="seed of the validation and few-shot splits (default: --seed); keeping it fixed while "
                          "--seed varies trains on the same images in another order")
    run.add_argument("--fp16-updates", action="store_true", help="send updates as float16 (half the bytes)")
    run.add_argument("--image-encoder-int8", action="store_true",
                     help="compute image features with the bundle's int8 image encoder (flora-export "
                          "--image-encoder-int8): faster on slow devices, slightly different features")
    run.add_argument("--dp-clip", type=Bounded(float, above=0.0, maximum=1e6),
                     metavar="C", help="differential privacy: clip every update's change to the round's global to L2 "
                                       "norm C, whatever the round asks (the smaller if it asks too)")
    run.add_argument("--exit-when-done", action="store_true", help="exit once the federation announces done")
    run.add_argument("--progress-every-s", type=Bounded(float, minimum=0.0), default=5.0,
                     help="seconds between progress lines")
    run.add_argument("--metrics-port", type=Bounded(int, minimum=0, maximum=65535), metavar="PORT",
                     help="serve this agent's step time, round time, samples, peak RSS and last round for "
                          "Prometheus at http://HOST:PORT/metrics (off by default)")
    run.add_argument("--metrics-host", default="127.0.0.1", help="address of --metrics-port (default: loopback)")
    run.add_argument("--slowdown", type=Bounded(float, minimum=1.0), default=1.0, metavar="F",
                     help="take F times as long per round as this device needs (a straggler, for tests and "
                          "simulations; default %(default)s)")
    run.add_argument("--max-round-jump", type=Bounded(int, minimum=0), default=1000, metavar="N",
                     help="refuse a round more than N rounds past the highest this agent has seen in the run "
                          "(a forged round number would silence it; 0: no bound; default %(default)s)")
    trust = run.add_argument_group("trust (what `flora-aggregator enroll` wrote into agent.toml)")
    trust.add_argument("--identity-dir", type=Path, metavar="DIR",
                       help="the device's enrollment folder: identity key and certificate, ca.crt, aggregator.pub")
    trust.add_argument("--aggregator-key", metavar="BASE64",
                       help="the aggregator's Ed25519 public key: only `global` and `round` messages it signed are "
                            "accepted (default: --aggregator-key-file, else DIR/aggregator.pub of --identity-dir; "
                            "with none, an open federation: messages are not authenticated)")
    trust.add_argument("--aggregator-key-file", type=Path, metavar="FILE",
                       help="a file holding the aggregator's public key (base64), e.g. aggregator.pub")
    trust.add_argument("--secure-aggregation", action="store_true",
                       help="take part in securely aggregated rounds only: this device's update never leaves it in "
                            "the clear (needs --identity-dir; without this flag an enrolled device joins secure "
                            "rounds and trains plain ones as before)")
    run.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    run.add_argument("--log-format", default="plain", choices=FORMATS,
                     help="plain lines, or one JSON object per line (journald, log shippers)")

    doctor = sub.add_parser("doctor", help="check this device: runtime, backend, memory, one timed step, broker",
                            description=DOCTOR_DESCRIPTION)
    add_config_option(doctor, "`flora-agent run` (bundle, broker, credentials, federation are read)")
    doctor.add_argument("--bundle", type=Path)
    add_connection_options(doctor, session_expiry=False)
    doctor.add_argument("--federation", help="federation whose retained round gives the batch size "
                                             "(default: the config file's, else 'default')")
    doctor.add_argument("--backend", default="auto", choices=BACKENDS)
    doctor.add_argument("--providers", type=comma_list)
    doctor.add_argument("--threads", type=Bounded(int, minimum=1))
    doctor.add_argument("--batch-size", type=Bounded(int, minimum=1), default=32,
                        help="batch size to check (default %(default)s)")
    doctor.add_argument("--log-level", default="WARNING", choices=LOG_LEVELS)
    add_predict_parser(sub)
    add_evaluate_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None, agent_class: Optional[type] = None) -> int:
    """The flora-agent command; `agent_class` (an Agent subclass) is for the simulator's poisoned devices."""
    parser = build_parser()
    argv = with_default_command(sys.argv[1:] if argv is None else argv, parser, "run")
    args = parser.parse_args(argv)
    command = parser.commands[args.command]
    # doctor, predict and evaluate read the agent's own config file: the keys only `run` has are skipped
    shared = config_keys(parser.commands["run"]) if args.command != "run" else ()
    try:
        config = load_toml(args.config)
        args = apply_config(command, args, argv[1:], config, ignore=shared)
    except ConfigError as exc:
        return report(PROG, exc)
    if args.command in ("predict", "evaluate"):  # stdout carries their results: logs go to stderr
        setup_logging(args.log_level, getattr(args, "log_format", "plain"), stream=sys.stderr)
        default_state_dir(args, config)
        return run_predict(args) if args.command == "predict" else run_evaluate(args)
    setup_logging(args.log_level, getattr(args, "log_format", "plain"))
    if args.command == "doctor":
        from .doctor import run_doctor

        return run_doctor(args)
    missing = [k for k in ("bundle", "data", "broker", "client_id") if not getattr(args, k)]
    if missing:
        return report(PROG, ConfigError(f"missing {', '.join('--' + m.replace('_', '-') for m in missing)} "
                                        "(on the command line or in --config)"))
    return run_agent(args) if agent_class is None else run_agent(args, agent_class)


def agent_config(args: argparse.Namespace):
    """The AgentConfig of parsed `run` options."""
    from .agent import AgentConfig

    return AgentConfig(
        bundle=Path(args.bundle), data=Path(args.data), broker=BrokerConfig.from_args(args),
        client_id=args.client_id, federation=args.federation,
        state_dir=Path(args.state_dir) if args.state_dir else None, backend=args.backend, threads=args.threads,
        providers=args.providers, shots=args.shots, val_fraction=args.val_fraction, seed=args.seed,
        fp16_updates=args.fp16_updates, image_encoder_int8=args.image_encoder_int8,
        exit_when_done=args.exit_when_done, progress_every_s=args.progress_every_s, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host, slowdown=args.slowdown, split_seed=args.split_seed,
        max_round_jump=args.max_round_jump,
        aggregator_key=args.aggregator_key,
        aggregator_key_file=args.aggregator_key_file, identity_dir=args.identity_dir,
        secure_aggregation=args.secure_aggregation, dp_clip=args.dp_clip,
    )


def run_agent(args: argparse.Namespace, agent_class: Optional[type] = None) -> int:
    from .agent import Agent

    try:
        cfg = agent_config(args)
        agent = (agent_class or Agent).open(cfg)
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
