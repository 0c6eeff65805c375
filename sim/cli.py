"""`flora-sim`: a real federated run on this machine (mosquitto, the aggregator, N agent processes).

It exports (or reuses) a bundle in OUT/bundle, splits the dataset among the clients, starts a
private mosquitto on a free loopback port, the aggregator and one flora-agent process per client,
prints a table row per round (held-out test accuracy, loss, bytes up/down, time) and writes
OUT/report.json and OUT/report.png. Ctrl-C, SIGTERM and SIGHUP stop every process it started.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from flora.edge.config import CommandParser, add_version_option, explicit_options
from flora.edge.errors import FloraError, report

EPILOG = """\
example (the README's demo):
  flora-sim --model clip-proxy --clients 4 --rounds 10 --partition dirichlet:0.5 --dataset digits --compare

exit status: 0 done, 1 error (every option is checked before any data is written or bundle exported),
2 unparsable arguments, 128+N stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)"""


def build_parser() -> CommandParser:
    p = CommandParser(prog="flora-sim", description=__doc__, epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_option(p)
    m = p.add_argument_group("model")
    m.add_argument("--model", default="clip-proxy",
                   help="flora-export preset to export into OUT/bundle (default: %(default)s, clip-tiny pre-trained "
                        "offline by flora-proxy, made once if missing; clip-tiny: random weights, for plumbing)")
    m.add_argument("--pretrained", metavar="PATH",
                   help="weights file for the export (an open_clip checkpoint of --model's architecture), as "
                        "flora-export --pretrained")
    m.add_argument("--bundle", type=Path, metavar="DIR",
                   help="use this flora-export bundle instead of exporting one (its classes must be the data's)")
    m.add_argument("--random-init", action="store_true",
                   help="export with random weights instead of pretrained ones (ViT presets offline)")
    m.add_argument("--backend", default="auto", choices=["auto", "ort-training", "step"],
                   help="trainer backend of the agents and baselines; the export includes it (auto: "
                        "ort-training where onnxruntime-training is installed, else step) (default: %(default)s)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="digits",
                   help="'digits' (scikit-learn's, written as PNG folders under OUT/data, offline) or an image "
                        "folder: DIR/<class>/ (20%% split off as the test set) or DIR/train/<class>/ and "
                        "DIR/test/<class>/ (default: %(default)s)")
    d.add_argument("--clients", type=int, default=4,
                   help="number of clients, each with its own data, state dir and MQTT identity (default: %(default)s)")
    d.add_argument("--processes", type=int, metavar="P",
                   help="agent processes for them (default: one per client); fewer than --clients hosts several "
                        "virtual clients per process sharing one ONNX Runtime session (the step backend)")
    d.add_argument("--partition", default="iid",
                   help="how the training images are split among clients: iid, dirichlet:ALPHA (label skew, "
                        "smaller is more skewed) or shards:K (K classes per client) (default: %(default)s)")
    d.add_argument("--shots", type=int, metavar="K", help="few-shot: keep K images per class on each client")
    d.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of each client's images it holds out for validation and does not train on; "
                        "the baselines leave out the same images (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0,
                   help="model seed: LoRA init (and random-init weights) and batch order; client i uses SEED+i "
                        "(default: %(default)s)")
    d.add_argument("--data-seed", type=int,
                   help="data seed: test split, partition, validation and few-shot splits (default: --seed); "
                        "fix it to compare settings on the same split")
    d.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="run N federations (model seed SEED+k, data seed DATA_SEED+k, each in OUT/seed-<k>) and "
                        "report mean +- sd; two settings run with the same seeds are paired run by run "
                        "(default: %(default)s)")
    t = p.add_argument_group("training")
    t.add_argument("--rounds", type=int, default=10, help="federated rounds (default: %(default)s)")
    t.add_argument("--epochs", type=int, default=5, help="local epochs per round (default: %(default)s)")
    t.add_argument("--lr", type=float, default=1e-3,
                   help="AdamW learning rate (default: %(default)s; at 3e-3 the centralised baseline of the "
                        "clip-tiny demo diverged after 6 rounds)")
    t.add_argument("--batch-size", type=int, default=32, help="training batch size (default: %(default)s)")
    t.add_argument("--recipe", choices=["default", "flora"],
                   help="flora-export --recipe for the bundle, and the recipe's epochs, batch size and lr for the "
                        "rounds (explicit --epochs/--batch-size/--lr override them); flora: FLORA's authors' recipe "
                        "(text out_proj LoRA rank 2, scale 32, Adam lr 5e-5 with L2 decay 0.2, batch 128, 1 epoch, "
                        "contrastive loss; step backend)")
    t.add_argument("--loss", choices=["ce", "contrastive"],
                   help="flora-export --loss (default: the recipe's, or ce)")
    t.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="lr across rounds, for the federation and every baseline alike; the round message carries "
                        "each round's lr (default: %(default)s)")
    t.add_argument("--reset-optimizer", action="store_true",
                   help="zero every client's (and baseline's) Adam moments at the start of every round")
    t.add_argument("--until-plateau", action="store_true",
                   help="stop once the federated test accuracy plateaus (mean of the last 10 rounds at most 0.5 "
                        "points above the 10 before); --rounds is the upper bound, the baselines run as many rounds")
    t.add_argument("--strategy", default="fedavg",
                   help="the aggregator's strategy: fedavg, flexlora, fedavgm, fedadam, fedyogi, norm-bound, median, "
                        "trimmed-mean (flora-aggregator --help) (default: %(default)s)")
    t.add_argument("--strategy-option", dest="strategy_option", action="extend", nargs="+",
                   metavar="KEY=VALUE", help="an option of the strategy, as flora-aggregator --strategy-option (e.g. "
                                             "server_lr=0.01; fedavg: product_error=true reports each round's error "
                                             "of averaging A and B separately) (repeatable)")
    t.add_argument("--fp16-updates", action="store_true", help="agents send their updates as fp16 (half the bytes)")
    t.add_argument("--image-encoder-int8", action="store_true",
                   help="export the int8 image encoder too and let the agents compute their features with it "
                        "(the aggregator's held-out test features stay fp32)")
    t.add_argument("--compare", action="store_true",
                   help="after the federated run add baselines to the report: zero-shot (round 0), centralised "
                        "LoRA on the union of the clients' training splits at equal epochs (--epochs a round) and at "
                        "equal steps (the federated model's sequential steps a round), and local-only LoRA per "
                        "client (mean of their test accuracies)")
    t.add_argument("--plot-x", choices=["rounds", "steps"], default="rounds",
                   help="x axis of report.png: rounds, or sequential optimizer steps (default: %(default)s)")
    a = p.add_argument_group("asynchronous rounds")
    a.add_argument("--mode", default="sync", choices=["sync", "async"],
                   help="async: buffered asynchronous rounds (FedBuff), run after a sync run on the same data and "
                        "reported side by side: time to the sync run's final accuracy (default: %(default)s)")
    a.add_argument("--straggler-factor", type=float, default=1.0, metavar="F",
                   help="the last client takes F times as long per round (flora-agent --slowdown) "
                        "(default: %(default)s)")
    a.add_argument("--buffer", type=int, help="async: updates per version (default: clients - 1)")
    a.add_argument("--max-staleness", type=int, default=10, help="async: see flora-aggregator (default: %(default)s)")
    a.add_argument("--staleness", default="sqrt", help="async: sqrt, constant or hinge:A,B (default: %(default)s)")
    a.add_argument("--server-lr", type=float, default=1.0, help="async: server learning rate (default: %(default)s)")
    d = p.add_argument_group("privacy and attacks (docs/privacy.md)")
    d.add_argument("--lora-variant", choices=["lora", "ffa"], default="lora",
                   help="export plain LoRA or FFA-LoRA (A frozen, only B trained and sent) (default: %(default)s)")
    d.add_argument("--dp-clip", type=float, metavar="C", help="differential privacy: clip each update's delta to C")
    d.add_argument("--dp-noise-multiplier", type=float, metavar="Z", help="noise std Z*C on the sum")
    d.add_argument("--dp-epsilon", type=float, metavar="E",
                   help="instead of Z: the noise multiplier that spends epsilon E over --rounds rounds of all clients")
    d.add_argument("--dp-delta", type=float, default=1e-5, help="delta of the accounting (default: %(default)s)")
    d.add_argument("--dp-max-epsilon", type=float, metavar="E", help="stop before a round would spend more than E")
    d.add_argument("--dp-accountant", choices=["pld", "rdp"], default="pld",
                   help="dp-accounting's PLD (tight) or RDP accountant (default: %(default)s)")
    d.add_argument("--dp-mode", choices=["central", "distributed"], default="central",
                   help="the aggregator adds the noise, or the devices do under secure aggregation "
                        "(default: %(default)s)")
    d.add_argument("--malicious", type=int, default=0, metavar="K", help="this many clients attack (seeded)")
    d.add_argument("--attack", help="what they do: sign-flip[:X], scale:X, noise[:S] or label-flip")
    r = p.add_argument_group("run")
    r.add_argument("--round-timeout", type=float, default=120.0,
                   help="seconds the aggregator waits for a round's updates (default: %(default)s)")
    r.add_argument("--timeout", type=float, default=1800.0,
                   help="give up on the whole federation after this many seconds (default: %(default)s)")
    r.add_argument("--out", type=Path, default=Path("runs/sim"), metavar="DIR",
                   help="run folder: bundle, data shards, logs, report.json, report.png (default: %(default)s)")
    r.add_argument("--secure-aggregation", action="store_true",
                   help="enroll every agent (identity, per-device TLS certificate, ACL), run mosquitto with the "
                        "certificate template and aggregate every round by SecAgg+: the aggregator sees only the sum")
    r.add_argument("--shares", type=int, metavar="K", help="with --secure-aggregation: neighbours holding shares")
    r.add_argument("--threshold", type=int, metavar="T", help="with --secure-aggregation: shares that recover one")
    r.add_argument("--http", metavar="HOST:PORT",
                   help="the aggregator serves its live dashboard and /metrics here while the federation runs")
    return p


#: the round settings a recipe gives (flora.export.recipes' `training`), by flora-sim option dest
RECIPE_TRAINING = ("epochs", "batch_size", "lr", "reset_optimizer")


def apply_recipe(parser: CommandParser, args: argparse.Namespace, argv: List[str]) -> argparse.Namespace:
    """With --recipe, the recipe's epochs, batch size, lr and optimizer reset where the command line gave none."""
    if not args.recipe:
        return args
    from flora.export.recipes import get_recipe

    given = explicit_options(parser, argv)
    for dest in RECIPE_TRAINING:
        if dest not in given:
            setattr(args, dest, get_recipe(args.recipe).training[dest])
    return args


def config_from_args(args: argparse.Namespace):
    from .run import SimConfig

    return SimConfig(
        model=args.model, clients=args.clients, rounds=args.rounds, partition=args.partition, dataset=args.dataset,
        out=args.out, shots=args.shots, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        compare=args.compare, backend=args.backend, fp16_updates=args.fp16_updates, bundle=args.bundle,
        image_encoder_int8=args.image_encoder_int8,
        val_fraction=args.val_fraction, round_timeout=args.round_timeout, timeout=args.timeout,
        random_init=args.random_init, http=args.http, processes=args.processes, mode=args.mode, buffer=args.buffer,
        max_staleness=args.max_staleness, staleness=args.staleness, server_lr=args.server_lr,
        straggler_factor=args.straggler_factor, secure_aggregation=args.secure_aggregation, shares=args.shares,
        threshold=args.threshold,
        pretrained=args.pretrained, data_seed=args.data_seed,
        seeds=args.seeds,
        lr_schedule=args.lr_schedule, reset_optimizer=args.reset_optimizer, until_plateau=args.until_plateau,
        plot_x=args.plot_x, strategy=args.strategy, strategy_options=tuple(args.strategy_option or ()),
        lora_variant=args.lora_variant, dp_clip=args.dp_clip,
        dp_noise_multiplier=args.dp_noise_multiplier, dp_epsilon=args.dp_epsilon, dp_delta=args.dp_delta,
        dp_max_epsilon=args.dp_max_epsilon,
        dp_accountant=args.dp_accountant, dp_mode=args.dp_mode, malicious=args.malicious, attack=args.attack,
        recipe=args.recipe, loss=args.loss,
    )


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = apply_recipe(parser, parser.parse_args(argv), argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    from .run import run
    from .signals import Terminated, terminate_as_interrupt

    try:
        with terminate_as_interrupt():
            run(config_from_args(args), say=lambda m: print(m, flush=True))
    except FloraError as exc:
        return report("flora-sim", exc, 1)
    except Terminated as exc:
        print(f"flora-sim: stopped by {exc}; every process it started was stopped", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("flora-sim: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
