"""`flora-export MODEL --classes FILE --out DIR`: write an on-device training bundle.

torch loads only once the arguments passed every check that needs no model (export/options.py):
--help, --version and argument errors answer at once, and on a machine without the export extra.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from flora.edge.config import CommandParser, add_version_option, comma_list
from flora.edge.errors import EXIT_BAD_INPUT, FloraError, report

from .options import (
    ALL_TARGETS,
    DEFAULT_PROMPT,
    DEFAULT_TARGETS,
    VARIANTS,
    ExportOptions,
    check_export,
    read_classes,
)
from .presets import PRESETS


def build_parser() -> CommandParser:
    presets = "\n".join(f"  {p.name:12s} {p.description}" for p in PRESETS.values())
    parser = CommandParser(
        prog="flora-export",
        description="Export open_clip CLIP + LoRA as an ONNX Runtime on-device training bundle.",
        epilog=f"presets:\n{presets}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version_option(parser)
    parser.add_argument("model", help="preset name (see below)")
    parser.add_argument("--classes", required=True, type=Path, help="text file, one class name per line")
    parser.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help="prompt template with one {} (default: %(default)r)")
    w = parser.add_argument_group("weights")
    w.add_argument("--pretrained", help="local checkpoint file, or an open_clip tag (default: the preset's tag)")
    w.add_argument("--random-init", action="store_true",
                   help="same architecture, seeded random weights (tests, benchmarks)")
    w.add_argument("--cache-dir", help="open_clip / Hugging Face cache folder to look in (default: theirs)")
    w.add_argument("--offline", action="store_true", help="never try to download weights")
    w.add_argument("--quick-gelu", action="store_true", default=None, help="QuickGELU activations (OpenAI weights)")
    lo = parser.add_argument_group("LoRA")
    lo.add_argument("--lora-tower", choices=["text", "vision", "both"], default="text",
                    help="where LoRA goes (default: text, FLORA's: the image encoder stays frozen)")
    lo.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    lo.add_argument("--alpha", type=float, default=16.0,
                    help="LoRA alpha; the scale is alpha/rank (default: %(default)s)")
    lo.add_argument("--targets", type=comma_list, default=",".join(DEFAULT_TARGETS),
                    help=f"comma list among {','.join(ALL_TARGETS)} (default: %(default)s)")
    lo.add_argument("--lora-variant", choices=list(VARIANTS), default="lora",
                    help="lora: A and B trained (FLORA's); ffa: FFA-LoRA, A drawn from --seed and frozen, only B "
                         "trained and sent (half the bytes, exact averaging, the DP-friendly adapter) "
                         "(default: %(default)s)")
    lo.add_argument("--seed", type=int, default=0,
                    help="seed of LoRA init (the frozen A with --lora-variant ffa) and of --random-init weights")
    t = parser.add_argument_group("training")
    t.add_argument("--backend", choices=["ort-training", "step", "all"], default="ort-training",
                   help="ort-training: ONNX Runtime training artifacts; step: one plain-ONNX training step graph "
                        "for devices with plain onnxruntime (Arm boards); all: both (default: %(default)s)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay baked into the ORT optimizer")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flora.export").setLevel(logging.WARNING if args.quiet else logging.INFO)
    # A CUDA build of torch on a machine without a GPU says so at import; it is not news here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger("onnxscript").setLevel(logging.ERROR)  # the step exporter's optimizer notes
    say = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    try:
        backends = ("ort-training", "step") if args.backend == "all" else (args.backend,)
        opts = ExportOptions(
            preset=args.model,
            classes=read_classes(args.classes),
            out=args.out,
            prompt=args.prompt,
            tower=args.lora_tower,
            rank=args.rank,
            alpha=args.alpha,
            targets=tuple(args.targets),
            lora_variant=args.lora_variant,
            pretrained=args.pretrained,
            random_init=args.random_init,
            cache_dir=args.cache_dir,
            offline=args.offline,
            quick_gelu=args.quick_gelu,
            seed=args.seed,
            backends=backends,
            weight_decay=args.weight_decay,
            force=args.force,
        )
        check_export(opts)  # before torch loads
        from .pipeline import export_bundle

        export_bundle(opts, say)
    except FloraError as exc:
        return report("flora-export", exc)
    except OSError as exc:  # the disk or the weights cache, not a bug
        return report("flora-export", exc, EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("flora-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
