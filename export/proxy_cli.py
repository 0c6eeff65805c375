"""`flora-proxy`: pre-train (once) the offline stand-in for CLIP weights that the clip-proxy preset loads."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

from flora.edge.config import CommandParser, add_version_option
from flora.edge.errors import FloraError, report


def build_parser() -> CommandParser:
    from .proxy import CHECKPOINT, ProxyConfig

    d = ProxyConfig()
    p = CommandParser(
        prog="flora-proxy",
        description="Pre-train clip-tiny contrastively on printed digits and letters (no download) and cache it "
                    f"as DIR/{CHECKPOINT}, the weights of the clip-proxy preset. Reused when it is up to date.",
        epilog="then: flora-export clip-proxy ... or flora-sim --model clip-proxy; any tool takes the file itself "
               "with --pretrained PATH (architecture clip-tiny)",
    )
    add_version_option(p)
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="folder of the checkpoint (default: $FLORA_PROXY_DIR, else ~/.cache/flora-edge/proxy; the "
                        "clip-proxy preset looks there)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--corpus", type=int, default=d.corpus, help="rendered glyphs (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="steps of linear lr warm-up (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads; part of what makes the result reproducible (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="pre-train again even if the cached checkpoint is current")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the checkpoint's path")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from .proxy import ProxyConfig, build, default_dir

    say = (lambda _m: None) if args.quiet else (lambda m: print(m, flush=True))
    try:
        cfg = ProxyConfig(steps=args.steps, batch_size=args.batch_size, corpus=args.corpus, seed=args.seed,
                          threads=args.threads, warmup=args.warmup)
        path = build(args.out or default_dir(), cfg, say=say, force=args.force)
    except FloraError as exc:
        return report("flora-proxy", exc)
    except OSError as exc:
        return report("flora-proxy", exc, 2)
    except KeyboardInterrupt:
        print("flora-proxy: interrupted; the cached checkpoint (if any) is unchanged", file=sys.stderr)
        return 130
    if args.quiet:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
