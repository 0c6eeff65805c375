"""`flora-aggregator`: run a federation (`run`, the default), show its state (`status`, `dashboard`), plot it
(`plot`), retire a device (`clear-status`), enroll or revoke one (`enroll`, `revoke`).

    flora-aggregator --bundle DIR --broker mqtt://HOST:PORT --rounds R --state-dir DIR [--http HOST:PORT] [options]
    flora-aggregator --config aggregator.toml
    flora-aggregator status --state-dir DIR [--clients] [--plot FILE.png]
    flora-aggregator dashboard --state-dir DIR [--http HOST:PORT]
    flora-aggregator plot --state-dir DIR --out FILE.png
    flora-aggregator clear-status DEVICE --broker mqtt://HOST:PORT [--federation NAME]
    flora-aggregator enroll DEVICE_ID --state-dir DIR --federation NAME [--out DIR] [--broker URL]
    flora-aggregator revoke DEVICE_ID --state-dir DIR --federation NAME

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
    Bounded,
    CommandParser,
    ConfigError,
    add_config_option,
    add_version_option,
    apply_config,
    load_toml,
    with_default_command,
)
from flora.edge.errors import EXIT_UNAVAILABLE, FloraError, report
from flora.edge.logs import FORMATS, setup_logging
from flora.edge.mqtt import BrokerConfig, add_connection_options

from .checkpoint import KEEP_BEST_METRICS, keep_globals_arg
from .schedule import LR_SCHEDULES
from .validation import DEFAULT_MAX_NUM_SAMPLES

PROG = "flora-aggregator"
DEFAULT_STATE_DIR = Path("flora-aggregator-state")
DEFAULT_HTTP = "127.0.0.1:8080"
LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


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
    t.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="lr across rounds: constant, or cosine from --lr down to ~0 at the last round")
    t.add_argument("--reset-optimizer", action="store_true",
                   help="ask clients to zero their Adam moments before every round (default: kept across rounds)")
    run.add_argument("--stop-on-plateau", type=int, metavar="WINDOW",
                     help="finish early once the mean held-out test accuracy (with --eval-data; else the mean client "
                          "validation accuracy) of the last WINDOW rounds is at most --plateau-delta above the WINDOW "
                          "before; --rounds stays the upper bound")
    run.add_argument("--plateau-delta", type=float, default=0.005,
                     help="with --stop-on-plateau: the gain that still counts as progress (default: 0.005)")
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
    a = run.add_argument_group("buffered asynchronous rounds (FedBuff)")
    a.add_argument("--mode", default="sync", choices=["sync", "async"],
                   help="sync: rounds of asked clients (the default); async: agents train whenever they hold a newer "
                        "global, a new global version every --buffer updates")
    a.add_argument("--buffer", type=int, default=10, help="async: updates folded into each new version (default: 10)")
    a.add_argument("--max-staleness", type=int, default=10,
                   help="async: reject updates whose base is more than this many versions old, as stale; the last "
                        "S + 1 globals are kept in memory and on disk (default: 10)")
    a.add_argument("--staleness", default="sqrt",
                   help="async: weight of an update s versions old: sqrt (1/(1+sqrt(s))), constant (1) or "
                        "hinge:A,B (1 up to B, then 1/(1+A(s-B))) (default: sqrt)")
    a.add_argument("--server-lr", type=float, default=1.0,
                   help="async: the server learning rate eta: next = current + eta * (buffer average - current)")
    g = run.add_argument_group("sites: aggregation over bridged brokers")
    g.add_argument("--role", default="root", choices=["root", "site"],
                   help="root: run the federation (the default); site: serve the root's rounds to this site's devices "
                        "and send the root one partial (weighted sum, total weight) per round")
    g.add_argument("--upstream", help="site: the broker where the root federation's topics are (the root's, or this "
                                      "site's own when a mosquitto bridge carries them; devices/mosquitto/)")
    g.add_argument("--upstream-federation", help="site: the root's federation name (default: --federation)")
    g.add_argument("--site-id", help="site: this site's client id in the root federation (default: --client-id)")
    g.add_argument("--sites", help="root: comma-separated client ids of site aggregators, whose updates are partials")
    run.add_argument("--strategy", default="fedavg",
                     help="aggregation strategy: fedavg (A and B averaged separately, FLORA's; the default), flexlora "
                          "(the exact mean of the B @ A products, truncated back to rank r by SVD), fedavgm, fedadam, "
                          "fedyogi (a server optimizer on the averaged update), norm-bound, median, trimmed-mean "
                          "(robust; docs/privacy.md)")
    run.add_argument("--strategy-option", dest="strategy_option", action="extend", nargs="+", default=[],
                     metavar="KEY=VALUE", help="an option of the strategy, e.g. server_lr=0.01, product_error=true "
                                               "(repeatable)")
    d = run.add_argument_group("differential privacy (DP-FedAvg: clipped deltas, Gaussian noise, accounted; "
                               "docs/privacy.md)")
    d.add_argument("--dp-clip", type=Bounded(float, above=0.0, maximum=1e6), metavar="C",
                   help="turn DP on: every update's change to the round's global is clipped to L2 norm C")
    d.add_argument("--dp-noise-multiplier", type=Bounded(float, minimum=0.0, maximum=1e6), metavar="Z",
                   help="noise std Z*C on the sum of the clipped deltas (`flora-aggregator dp-plan` finds Z for a "
                        "target epsilon)")
    d.add_argument("--dp-delta", type=Bounded(float, above=0.0, below=1.0), default=1e-5,
                   help="the delta epsilon is counted at (default %(default)g; keep it below 1/devices)")
    d.add_argument("--dp-max-epsilon", type=Bounded(float, above=0.0), metavar="E",
                   help="stop the federation before a round would take epsilon above E")
    d.add_argument("--dp-accountant", choices=["pld", "rdp"], default="pld",
                   help="dp-accounting's privacy loss distributions (tight, default) or Renyi DP")
    d.add_argument("--dp-mode", choices=["central", "distributed"], default="central",
                   help="who adds the noise: the aggregator (central, default) or the devices, each a share, "
                        "under secure aggregation (distributed)")
    run.add_argument("--max-update-bytes", type=int, help="reject larger updates (default: fp32 size + 64 KiB)")
    run.add_argument("--max-queued-updates", type=int, default=32,
                     help="updates held in memory before the rest wait at the broker (default: 32)")
    run.add_argument("--max-queued-bytes", type=Bounded(int, minimum=1), default=256 << 20,
                     help="... and at most these many bytes of them (default: 256 MiB)")
    run.add_argument("--rate-limit", type=_rate, default="1/s,burst=10", metavar="N/s[,burst=B]",
                     help="per client: updates beyond this rate are counted rate-limited without being read, so "
                          "one device flooding its topic cannot starve the others (default: %(default)s; off: no "
                          "limit)")
    run.add_argument("--message-rate-limit", type=_rate, default="5/s,burst=50", metavar="N/s[,burst=B]",
                     help="per client: statuses and metrics beyond this rate are dropped (default: %(default)s)")
    run.add_argument("--max-num-samples", type=int, default=DEFAULT_MAX_NUM_SAMPLES,
                     help="reject updates claiming more local samples, as bad-num-samples (default: 10**9)")
    run.add_argument("--eval-data", type=Path, help="held-out images (folder or CSV) to test every global on; a new "
                     "global whose test loss or accuracy is not finite is rolled back (the round recorded failed)")
    b = run.add_argument_group("one client's influence on a round (sync rounds, also at a site; an update's "
                               "num_samples above what its device declared in its status is always rejected as "
                               "over-declared)")
    b.add_argument("--max-client-share", type=Bounded(float, above=0.0, maximum=1.0), metavar="F",
                   help="no client carries more than this share of a round's total weight unless it is the only one: "
                        "larger weights are lowered to the cap (default: 0.5; 1: no cap)")
    b.add_argument("--norm-bound", type=Bounded(float, minimum=0.0), metavar="X",
                   help="an update whose delta from the round's global is over X times the median norm of the "
                        "round's other updates (of earlier rounds for a round of one) is refused as norm-outlier, "
                        "or clipped to that bound (default: 10; 0: no bound)")
    b.add_argument("--norm-bound-action", choices=["reject", "clip"],
                   help="what --norm-bound does to an outlier (default: reject)")
    run.add_argument("--sign", default="auto", choices=["auto", "yes", "no"],
                     help="sign `global` and `round` with the federation's Ed25519 key in the state dir: auto when "
                          "it is there (`enroll` makes it), yes (made if missing), no (default %(default)s); "
                          "agents given the key (--aggregator-key, --identity-dir) accept only signed messages")
    sa = run.add_argument_group("secure aggregation (the aggregator sees only the sum of the updates; devices enrolled "
                                "with `enroll`, docs/protocol.md)")
    sa.add_argument("--secure-aggregation", action="store_true",
                    help="every round by SecAgg+ (masked updates, dropout-tolerant); needs a strategy whose aggregate "
                         "is a weighted sum (fedavg)")
    sa.add_argument("--shares", type=Bounded(int, minimum=2), metavar="K",
                    help="neighbours of each device that hold shares of its secrets, even (default 2*ceil(log2 n), "
                         "at least 4, at most n-1)")
    sa.add_argument("--threshold", type=Bounded(int, minimum=2), metavar="T",
                    help="shares that recover a secret, > K/2 (default K/2 + 1): up to K - T of a device's "
                         "neighbours may drop out")
    sa.add_argument("--stage-timeout", type=Bounded(float, above=0.0), default=60.0, metavar="S",
                    help="seconds each stage after advertise-keys waits for the devices (default %(default)s)")
    sa.add_argument("--max-attempts", type=Bounded(int, minimum=1), default=3,
                    help="attempts per round (fresh keys each) before the round fails (default %(default)s)")
    sa.add_argument("--secagg-clip", type=Bounded(float, above=0.0), default=1.0, metavar="C",
                    help="each element of an update's delta is clipped to [-C, C] before fixed-point encoding "
                         "(default %(default)s)")
    sa.add_argument("--secagg-frac-bits", type=Bounded(int, minimum=0, maximum=40), default=16, metavar="F",
                    help="fixed-point resolution 2^-F: the mean is within 2^-F per element (default %(default)s)")
    k = run.add_argument_group("models kept in the state dir")
    k.add_argument("--keep-globals", type=keep_globals_arg, default="1", metavar="N|all",
                   help="keep the N latest global adapters (global-NNNNNN.safetensors), or all (default: 1)")
    k.add_argument("--keep-best", nargs="?", const="auto", choices=KEEP_BEST_METRICS, metavar="METRIC",
                   help="also keep the best global by METRIC: test_accuracy (needs --eval-data), "
                        "mean_client_accuracy, or auto (the default METRIC: test_accuracy with --eval-data, else "
                        "mean_client_accuracy); `status` names it")
    m = add_connection_options(run.add_argument_group("broker connection"))
    m.add_argument("--client-id", default="flora-aggregator", help="MQTT client id (and, by convention, username)")
    run.add_argument("--http", metavar="HOST:PORT",
                     help="serve the live dashboard and /metrics here (off by default; a bare PORT is loopback; "
                          "FLORA_DASHBOARD_TOKEN asks for a token)")
    run.add_argument("--log-level", default="INFO", choices=LEVELS)
    run.add_argument("--log-format", default="plain", choices=FORMATS,
                     help="plain lines, or one JSON object per line (journald, log shippers)")

    status = sub.add_parser("status", help="current round and the history of a state dir")
    status.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    status.add_argument("--plot", type=Path, help="also write the PNG plot here")
    status.add_argument("--clients", action="store_true",
                        help="also one row per device: state, last seen, backend, samples, last metrics, last error")
    plan = sub.add_parser("dp-plan", help="the noise multiplier for a target epsilon, and the epsilon of a plan")
    plan.add_argument("--devices", type=Bounded(int, minimum=1), required=True, help="devices online per round")
    plan.add_argument("--clients-per-round", type=Bounded(int, minimum=1), help="asked per round (default: all)")
    plan.add_argument("--rounds", type=Bounded(int, minimum=1), required=True)
    plan.add_argument("--epsilon", type=Bounded(float, above=0.0), help="target epsilon: prints the noise multiplier")
    plan.add_argument("--noise-multiplier", type=Bounded(float, above=0.0), help="prints the epsilon it reaches")
    plan.add_argument("--delta", type=Bounded(float, above=0.0, below=1.0), default=1e-5)
    plan.add_argument("--accountant", choices=["pld", "rdp"], default="pld")
    plot = sub.add_parser("plot", help="PNG of accuracy and bytes per round")
    plot.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    plot.add_argument("--out", type=Path, required=True)
    dash = sub.add_parser("dashboard", help="serve the dashboard and /metrics of a state dir, read-only (a running "
                                            "federation's, or a copy of one)")
    dash.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    dash.add_argument("--http", default=DEFAULT_HTTP, metavar="HOST:PORT", help="where (default %(default)s)")
    dash.add_argument("--log-level", default="INFO", choices=LEVELS)
    limits = sub.add_parser("broker-limits", help="mosquitto config lines that size its queues for a federation "
                                                  "(put them in a conf.d drop-in)")
    limits.add_argument("--clients", type=Bounded(int, minimum=1), required=True, help="devices in the federation")
    limits.add_argument("--bundle", type=Path, help="the bundle (its largest valid update sets the sizes)")
    limits.add_argument("--max-update-bytes", type=Bounded(int, minimum=1),
                        help="instead of --bundle: the largest valid update, in bytes")
    clear = sub.add_parser("clear-status", help="remove the retained status of a retired device (it then no "
                                                "longer shows as a device nor counts as online)")
    clear.add_argument("device", help="the device's client id")
    clear.add_argument("--federation", default="default", help="federation name (topics flora/<name>/...)")
    add_connection_options(clear.add_argument_group("broker connection (an operator account that may write "
                                                    "flora/<federation>/status/+; see devices/mosquitto/acl)"))
    clear.add_argument("--client-id", default="flora-operator",
                       help="MQTT client id (not the aggregator's: that would take over its session)")
    enroll = sub.add_parser("enroll", help="issue a device's identity key, TLS certificate from the federation's "
                                           "CA, ACL entry and config snippet (the CA is made on first use)")
    enroll.add_argument("device_id", help="the device's client id")
    enroll.add_argument("--out", type=Path, help="folder for the device's files (default: flora-enrolled/ID here)")
    enroll.add_argument("--broker", default="mqtts://localhost:8883", help="broker URL written into the snippet")
    enroll.add_argument("--broker-name", action="append", dest="broker_names",
                        help="a DNS name or IP of the broker for its TLS certificate, made with the CA (repeat; "
                             "default: localhost and 127.0.0.1)")
    revoke = sub.add_parser("revoke", help="revoke a device: registry, CRL and ACL")
    revoke.add_argument("device_id")
    for p in (enroll, revoke):
        p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
        p.add_argument("--federation", default="default", help="federation name (a state dir serves one)")
    return parser


def enrollment(args: argparse.Namespace) -> int:
    """`enroll` and `revoke`: print what was done, and where the broker's files are."""
    from .enroll import FederationPKI

    pki = FederationPKI(args.state_dir, args.federation)
    if args.command == "revoke":
        pki.revoke(args.device_id)
        print(f"revoked {args.device_id}: ACL {pki.write_acl()}, CRL {pki.pki / 'crl.pem'} (reload mosquitto)")
        return 0
    pki.ensure(tuple(args.broker_names or ("localhost", "127.0.0.1")))
    out = pki.enroll(args.device_id, args.out, args.broker)
    print(f"enrolled {args.device_id} in federation {args.federation}: copy {out} to the device "
          f"(its agent.toml points at the files there); ACL {pki.state_dir / 'mosquitto' / 'acl'} "
          "(reload mosquitto)")
    return 0


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
    if args.command == "dp-plan":
        return dp_plan(args)
    if args.command == "dashboard":
        setup_logging(args.log_level)
        return serve_dashboard(args.state_dir, args.http)
    if args.command == "clear-status":
        setup_logging("WARNING")
        return clear_status(args)
    if args.command in ("enroll", "revoke"):
        try:
            return enrollment(args)
        except FloraError as exc:
            return report(PROG, exc)
    if args.command == "broker-limits":
        return print_broker_limits(args)
    try:
        args = apply_config(parser.commands["run"], args, argv[1:], load_toml(args.config))
    except ConfigError as exc:
        return report(PROG, exc)
    setup_logging(args.log_level, args.log_format)
    return run(args)


def _rate(text):
    """--rate-limit's type: a Rate (from 'N/s,burst=B' or 'off', or one already parsed)."""
    from .ratelimit import Rate

    if isinstance(text, Rate):
        return text
    try:
        return Rate.parse(str(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def print_broker_limits(args: argparse.Namespace) -> int:
    """`broker-limits`: mosquitto's queue and packet limits for `--clients` devices of a bundle."""
    from flora.edge import adapter
    from flora.edge.bundle import load_manifest

    from .mosquitto import queue_limits

    if (args.bundle is None) == (args.max_update_bytes is None):
        return report(PROG, ConfigError("give exactly one of --bundle and --max-update-bytes"))
    try:
        size = args.max_update_bytes or adapter.max_blob_bytes(load_manifest(args.bundle).trainable)
    except FloraError as exc:
        return report(PROG, exc)
    print(f"# flora: the aggregator's session holds a whole round of {args.clients} devices unread "
          f"(updates of at most {size} bytes); `flora-aggregator broker-limits --clients {args.clients}`")
    for line in queue_limits(args.clients, size):
        print(line)
    return 0


def _until_signalled() -> None:
    """Block until SIGINT or SIGTERM."""
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    while not stop.wait(0.5):
        pass


def serve_dashboard(state_dir: Path, address: str) -> int:
    """`dashboard`: the read-only page and /metrics of a state dir, until SIGINT/SIGTERM."""
    import os

    from .dashboard.server import TOKEN_ENV, state_dir_dashboard

    if not (Path(state_dir) / "state.json").exists():
        return report(PROG, ConfigError(f"no aggregator state (state.json) in {state_dir}"))
    try:
        dash = state_dir_dashboard(state_dir, address, os.environ.get(TOKEN_ENV)).start()
    except FloraError as exc:
        return report(PROG, exc)
    print(f"dashboard of {state_dir} on {dash.url} (read-only; Ctrl-C stops)", flush=True)
    try:
        _until_signalled()
    finally:
        dash.stop()
    return 0


def clear_status(args: argparse.Namespace) -> int:
    """`clear-status DEVICE`: publish an empty retained message on its status topic (MQTT's way to delete one)."""
    from flora.edge.mqtt import Connection, make_client
    from flora.edge.protocol import QOS, Topics, check_id

    try:
        topic = Topics(args.federation).status(check_id(args.device))
        broker = BrokerConfig.from_args(args)
        client = make_client(broker, args.client_id)
        connection = Connection(broker, client)
        connection.start(timeout=30)
    except FloraError as exc:
        return report(PROG, exc)
    try:
        info = client.publish(topic, b"", qos=QOS, retain=True)
        info.wait_for_publish(timeout=30)
        if not info.is_published():
            return report(PROG, RuntimeError(f"no acknowledgement from the broker for {topic}"), EXIT_UNAVAILABLE)
    finally:
        connection.stop()
    print(f"cleared the retained status of {args.device} ({topic})")
    return 0


def _load_inputs(args: argparse.Namespace):
    """(bundle or None, manifest, initial adapter tensors) from --bundle or --manifest."""
    from flora.edge import adapter
    from flora.edge.bundle import ADAPTER, load_bundle, load_manifest, verify_file

    if bool(args.bundle) == bool(args.manifest):
        raise ConfigError("give exactly one of --bundle and --manifest")
    bundle = None
    if args.bundle:  # the model files are read (and so verified) only to evaluate
        bundle = load_bundle(args.bundle, verify=bool(args.eval_data))
        manifest, root = bundle.manifest, bundle.root
    else:
        manifest, root = load_manifest(args.manifest), args.manifest.parent
    if args.initial_adapter is None:  # the bundle's own initial adapter: checked against its manifest sha256
        verify_file(root, manifest, ADAPTER)
    initial_path = args.initial_adapter or Path(root) / ADAPTER
    initial = adapter.load_file(initial_path, manifest.trainable, model_id=manifest.model_id)
    return bundle, manifest, initial.as_float32()


def dp_plan(args: argparse.Namespace) -> int:
    """`dp-plan`: the noise multiplier a target epsilon needs, or the epsilon a noise multiplier reaches, for a
    plan of rounds (dp-accounting, as the aggregator counts them)."""
    from .accountant import AccountingError, RoundEvent, epsilon, noise_for_epsilon

    per_round = min(args.clients_per_round or args.devices, args.devices)
    if (args.epsilon is None) == (args.noise_multiplier is None):
        return report(PROG, ConfigError("give exactly one of --epsilon and --noise-multiplier"))
    q = per_round / args.devices
    plan = (f"{args.rounds} rounds of {per_round} of {args.devices} devices (q = {q:.4g}), delta {args.delta:g}, "
            f"{args.accountant}")
    try:
        if args.epsilon is not None:
            z = noise_for_epsilon(args.epsilon, args.rounds, q, args.delta, args.accountant)
            print(f"noise multiplier {z:.4f} for epsilon {args.epsilon:g}: {plan}; the noise on each round's "
                  f"average has std {z / per_round:.4g} x the clip norm")
        else:
            eps = epsilon([RoundEvent(q, args.noise_multiplier)] * args.rounds, args.delta, args.accountant)
            print(f"epsilon {eps:.4f} with noise multiplier {args.noise_multiplier:g}: {plan}")
    except AccountingError as exc:
        return report(PROG, exc)
    return 0


def dp_settings(args: argparse.Namespace):
    """The DP settings of `run` (None without --dp-clip); ConfigError for DP options without --dp-clip."""
    from .accountant import DPSettings

    if args.dp_clip is None:
        stray = [f"--{k.replace('_', '-')}" for k in ("dp_noise_multiplier", "dp_max_epsilon")
                 if getattr(args, k) is not None]
        if stray or args.dp_mode != "central":
            raise ConfigError(f"{', '.join(stray) or '--dp-mode'} need(s) --dp-clip C (the clip norm turns DP on)")
        return None
    if args.dp_noise_multiplier is None:
        raise ConfigError("--dp-clip needs --dp-noise-multiplier Z (flora-aggregator dp-plan finds Z for a target "
                          "epsilon)")
    return DPSettings(args.dp_clip, args.dp_noise_multiplier, args.dp_delta, args.dp_max_epsilon,
                      args.dp_accountant, args.dp_mode)


def _hooks(bundle, eval_data: Optional[Path]) -> Dict[str, Any]:
    """--eval-data: test the initial global and every new one on held-out images (server side)."""
    if not eval_data:
        return {}
    if bundle is None:
        raise ConfigError("--eval-data needs --bundle (it runs the bundle's models)")
    from .evaluation import HeldOutEvaluator

    evaluator = HeldOutEvaluator(bundle, eval_data)
    return {"on_start": evaluator, "on_round_closed": evaluator.on_round_closed}


def _buffer(args: argparse.Namespace):
    """The async buffer's settings (checked even in sync mode, where they are unused)."""
    from .fedbuff import BufferConfig, Staleness

    try:
        return BufferConfig(args.buffer, args.max_staleness, Staleness.parse(args.staleness), args.server_lr,
                            args.min_clients)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _influence(args: argparse.Namespace):
    """The influence policy; its share cap and norm bound need plain per-update rounds: refused with secure
    aggregation (the aggregator sees only the sum) and with --mode async (a buffer's fold is not a round)."""
    from .influence import InfluencePolicy

    given = [f for f, v in (("--max-client-share", args.max_client_share), ("--norm-bound", args.norm_bound),
                            ("--norm-bound-action", args.norm_bound_action)) if v is not None]
    if given and (args.secure_aggregation or args.mode != "sync"):
        other = "--secure-aggregation" if args.secure_aggregation else "--mode async"
        raise ConfigError(f"{', '.join(given)}: not with {other} (no round of single updates to bound; in async the "
                          "declared num_samples check still applies)")
    try:
        return InfluencePolicy(args.max_client_share or 0.5, 10.0 if args.norm_bound is None else args.norm_bound,
                               args.norm_bound_action or "reject")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _sites(text: Optional[str]) -> frozenset:
    from flora.edge.protocol import check_id

    return frozenset(check_id(s.strip(), "site id") for s in (text or "").split(",") if s.strip())


def run(args: argparse.Namespace) -> int:
    from flora.edge.protocol import TrainConfig

    from .aggregator import AggregatorConfig
    from .async_rounds import make_aggregator
    from .rounds import Sampling
    from .schedule import Plateau
    from .strategies import STRATEGIES, parse_assignments

    log = logging.getLogger("flora.aggregator")
    dashboard = None
    if args.strategy not in STRATEGIES:
        return report(PROG, ConfigError(f"unknown --strategy {args.strategy!r}; known: {sorted(STRATEGIES)}"))
    try:
        broker = BrokerConfig.from_args(args)
        dp, strategy_options = dp_settings(args), parse_assignments(args.strategy_option)  # before any heavy work
        influence = _influence(args)
        bundle, manifest, initial = _load_inputs(args)
        cfg = AggregatorConfig(
            manifest=manifest, initial_adapter=initial, broker=broker, state_dir=args.state_dir,
            rounds=args.rounds, federation=args.federation,
            train=TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                              weight_decay=args.weight_decay, reset_optimizer=bool(args.reset_optimizer)),
            lr_schedule=args.lr_schedule,
            stop_on_plateau=Plateau(args.stop_on_plateau, args.plateau_delta) if args.stop_on_plateau else None,
            sampling=Sampling(args.clients_per_round, args.fraction, args.min_clients, args.seed),
            round_timeout_s=args.round_timeout, wait_for_clients=args.wait_for_clients,
            wait_timeout_s=args.wait_timeout, metrics_grace_s=args.metrics_grace, strategy=args.strategy,
            strategy_options=strategy_options, dp=dp,
            max_update_bytes=args.max_update_bytes, max_num_samples=args.max_num_samples,
            max_extensions=args.max_extensions, max_queued_updates=args.max_queued_updates,
            max_queued_bytes=args.max_queued_bytes, update_rate=_rate(args.rate_limit),
            message_rate=_rate(args.message_rate_limit), client_id=args.client_id, mode=args.mode,
            buffer=_buffer(args), sites=_sites(args.sites), sign=args.sign,
            secure_aggregation=args.secure_aggregation, secagg=_secure_settings(args),
            keep_globals=args.keep_globals, keep_best=args.keep_best, influence=influence,
            **_hooks(bundle, args.eval_data),
        )
        if args.http:
            cfg.snapshots, dashboard = _live_dashboard(args.http)
        if args.role == "site":
            from .site import site_from_args

            if args.secure_aggregation:
                raise ConfigError("--secure-aggregation is not available for --role site (a site's partial is a "
                                  "plain weighted sum)")
            aggregator = site_from_args(cfg, args.upstream, args.upstream_federation, args.site_id)
        else:
            aggregator = make_aggregator(cfg)
    except FloraError as exc:
        if dashboard is not None:
            dashboard.stop()
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
    finally:
        if dashboard is not None:
            dashboard.stop()


def _secure_settings(args: argparse.Namespace):
    from flora.edge.secagg.encoding import Encoding

    from .secure_round import SecureSettings

    return SecureSettings(args.shares, args.threshold, Encoding(args.secagg_clip, args.secagg_frac_bits),
                          args.stage_timeout, args.max_attempts)


def _live_dashboard(address: str):
    """(snapshots the aggregator publishes into, the started dashboard serving them) for `--http`."""
    import os

    from .dashboard.metrics import metrics_endpoint
    from .dashboard.server import TOKEN_ENV, Dashboard, Snapshots

    snapshots = Snapshots()
    dashboard = Dashboard(address, snapshots, metrics_endpoint(snapshots.latest), os.environ.get(TOKEN_ENV)).start()
    logging.getLogger("flora.aggregator").info("dashboard and /metrics on %s", dashboard.url)
    return snapshots, dashboard


if __name__ == "__main__":
    sys.exit(main())
