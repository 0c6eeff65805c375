"""`flora-sim`: a real federated run on this machine (mosquitto, the aggregator, N agent processes)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flora-sim", description=__doc__,
        epilog="example: flora-sim --model clip-tiny --clients 4 --rounds 10 --partition dirichlet:0.5 --compare")
    p.add_argument("--model", default="clip-tiny", help="flora-export preset (default: %(default)s, works offline)")
    p.add_argument("--bundle", type=Path, help="use this bundle instead of exporting one")
    p.add_argument("--random-init", action="store_true", help="export with random weights (ViT presets offline)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--partition", default="iid", help="iid, dirichlet:ALPHA or shards:K (default: %(default)s)")
    p.add_argument("--dataset", default="digits", help="'digits' (scikit-learn's, offline) or an image folder")
    p.add_argument("--shots", type=int, help="keep K images per class on each client (few-shot)")
    p.add_argument("--epochs", type=int, default=5, help="local epochs per round (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="store_true", help="also run zero-shot, centralised and local-only baselines")
    p.add_argument("--backend", default="auto", choices=["auto", "ort-training", "step"])
    p.add_argument("--fp16-updates", action="store_true")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--round-timeout", type=float, default=120.0)
    p.add_argument("--timeout", type=float, default=1800.0, help="give up on the whole run after this many seconds")
    p.add_argument("--out", type=Path, default=Path("runs/sim"), help="run folder (default: %(default)s)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    from broker.mosquitto import MosquittoError
    from edge.bundle import BundleError

    from .partition import PartitionError
    from .run import SimConfig, SimError, run

    cfg = SimConfig(
        model=args.model, clients=args.clients, rounds=args.rounds, partition=args.partition, dataset=args.dataset,
        out=args.out, shots=args.shots, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        compare=args.compare, backend=args.backend, fp16_updates=args.fp16_updates, bundle=args.bundle,
        val_fraction=args.val_fraction, round_timeout=args.round_timeout, timeout=args.timeout,
        random_init=args.random_init,
    )
    try:
        run(cfg, say=lambda m: print(m, flush=True))
    except (SimError, MosquittoError, PartitionError, BundleError, ValueError) as exc:
        print(f"flora-sim: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("flora-sim: interrupted; every process was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
