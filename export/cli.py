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

from flora.edge.config import CommandParser, add_version_option, comma_list, explicit_options
from flora.edge.errors import EXIT_BAD_INPUT, FloraError, report

from .options import (
    ALL_TARGETS,
    DEFAULT_PROMPT,
    DEFAULT_TARGETS,
    INITS,
    LOSSES,
    OPTIMIZERS,
    SCALINGS,
    VARIANTS,
    ExportOptions,
    check_export,
    read_classes,
)
from .presets import PRESETS
from .recipes import RECIPES, export_settings

#: flora-export option (argparse dest) -> ExportOptions field, for what a recipe sets
RECIPE_OPTIONS = {"lora_tower": "tower", "targets": "targets", "rank": "rank", "alpha": "alpha",
                  "lora_scaling": "lora_scaling", "lora_init": "lora_init", "lora_variant": "lora_variant",
                  "optimizer": "optimizer", "adam_betas": "betas", "adam_eps": "eps", "weight_decay": "weight_decay",
                  "loss": "loss", "backend": "backends"}


def _betas(text: str):
    parts = comma_list(text)
    try:
        betas = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.98, got {text!r}") from None
    if len(betas) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.98, got {text!r}")
    return betas


def build_parser() -> CommandParser:
    presets = "\n".join(f"  {p.name:12s} {p.description}" for p in PRESETS.values())
    parser = CommandParser(
        prog="flora-export",
        description="Export open_clip CLIP + LoRA as an ONNX Runtime on-device training bundle.",
        epilog=f"presets:\n{presets}\n\nother commands:\n  flora-export merge --bundle B --adapter FILE --out "
               "model.safetensors   (see flora-export merge -h)\n"
               "  flora-export strip --backend step BUNDLE OUT   (see flora-export strip -h)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version_option(parser)
    parser.add_argument("model", help="an open_clip architecture (ViT-B-32, MobileCLIP-S2, ...) or a preset alias "
                                      "(below)")
    parser.add_argument("--classes", required=True, type=Path, help="text file, one class name per line")
    parser.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help="prompt template with one {} (default: %(default)r)")
    w = parser.add_argument_group("weights")
    w.add_argument("--pretrained", help="an open_clip tag (laion2b_s34b_b79k, openai, datacompdr, ...), a checkpoint "
                                        "file (.safetensors, .bin, .pt, OpenAI's TorchScript .pt) or a Hugging Face "
                                        "snapshot folder (default: the preset's tag)")
    w.add_argument("--random-init", action="store_true",
                   help="same architecture, seeded random weights (tests, benchmarks)")
    w.add_argument("--cache-dir", help="open_clip / Hugging Face cache folder to look in (default: theirs)")
    w.add_argument("--offline", action="store_true", help="never try to download weights")
    w.add_argument("--quick-gelu", action="store_true", default=None,
                   help="QuickGELU activations (default: on for OpenAI-style weights and tags that ask for it)")
    w.add_argument("--no-quick-gelu", dest="quick_gelu", action="store_false", help="plain GELU, whatever the weights")
    recipes = "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values())
    parser.add_argument("--recipe", choices=list(RECIPES),
                        help=f"a named set of LoRA, optimizer and loss settings (explicit options override it; the "
                             f"manifest records it): {recipes}")
    lo = parser.add_argument_group("LoRA")
    lo.add_argument("--lora-tower", choices=["text", "vision", "both"], default="text",
                    help="where LoRA goes (default: text, FLORA's: the image encoder stays frozen)")
    lo.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    lo.add_argument("--alpha", type=float, default=16.0,
                    help="LoRA alpha; the scale is alpha/rank, or alpha with --lora-scaling alpha (default: "
                         "%(default)s)")
    lo.add_argument("--lora-scaling", choices=list(SCALINGS), default="alpha/rank",
                    help="the update's scale: alpha/rank (PEFT's) or alpha (FLORA's authors') (default: %(default)s)")
    lo.add_argument("--lora-init", choices=list(INITS), default="kaiming",
                    help="A's start: kaiming (uniform, as nn.Linear) or gaussian (N(0,1)/sqrt(rank), FLORA's "
                         "authors') (default: %(default)s)")
    lo.add_argument("--targets", type=comma_list, default=",".join(DEFAULT_TARGETS),
                    help=f"comma list among {','.join(ALL_TARGETS)} (default: %(default)s)")
    lo.add_argument("--lora-variant", choices=list(VARIANTS), default="lora",
                    help="lora: A and B trained (FLORA's); ffa: FFA-LoRA, A drawn from --seed and frozen, only B "
                         "trained and sent (half the bytes, exact averaging, the DP-friendly adapter) "
                         "(default: %(default)s)")
    lo.add_argument("--seed", type=int, default=0,
                    help="seed of LoRA init (the frozen A with --lora-variant ffa) and of --random-init weights")
    t = parser.add_argument_group("training")
    t.add_argument("--backend", choices=["ort-training", "step", "all"], default="all",
                   help="ort-training: ONNX Runtime training artifacts (x86-64 and macOS devices); step: one "
                        "plain-ONNX training step graph for devices with plain onnxruntime (Raspberry Pi, Jetson); "
                        "all: both, so the bundle trains on any device (default: %(default)s)")
    t.add_argument("--weight-decay", type=float, default=0.0,
                   help="weight decay (AdamW: baked into the ORT optimizer; adam: the L2 coefficient)")
    t.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw",
                   help="adamw: decoupled weight decay (torch.optim.AdamW); adam: L2 weight decay added to the "
                        "gradient (torch.optim.Adam, FLORA's authors'; step backend only) (default: %(default)s)")
    t.add_argument("--adam-betas", type=_betas, default=(0.9, 0.999), metavar="B1,B2",
                   help="Adam betas (default: 0.9,0.999)")
    t.add_argument("--adam-eps", type=float, default=1e-8, help="Adam eps (default: %(default)s)")
    t.add_argument("--loss", choices=list(LOSSES), default="ce",
                   help="ce: cross-entropy over the class-prompt head; contrastive: CLIP's symmetric image-text loss "
                        "over the batch (same-class pairs are negatives) (default: %(default)s)")
    parser.add_argument("--image-encoder-int8", action="store_true",
                        help="also write image_encoder_int8.onnx (int8 weights, ONNX Runtime dynamic quantization) "
                             "for slow devices (text tower only; devices use it with --image-encoder-int8)")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    return parser


def build_merge_parser() -> CommandParser:
    parser = CommandParser(
        prog="flora-export merge",
        description="Merge an adapter (e.g. the federation's latest global) into the model: open_clip weights "
                    "with W + (alpha/rank) B A, or one ONNX graph from pixels to logits.",
    )
    add_version_option(parser)
    parser.add_argument("--bundle", required=True, type=Path, help="the bundle the adapter was trained for")
    parser.add_argument("--adapter", required=True, type=Path,
                        help="adapter file (an aggregator's global-NNNNNN.safetensors, an agent's global.safetensors)")
    parser.add_argument("--out", required=True, type=Path,
                        help="model.safetensors, model.bin/.pt (torch pickle), model.onnx with --format onnx, or a "
                             "folder (open_clip_config.json + weights, for open_clip's local-dir:)")
    parser.add_argument("--format", choices=["open_clip", "onnx"], default=None,
                        help="open_clip weights (default) or onnx (default when --out ends in .onnx)")
    parser.add_argument("--pretrained", help="the base checkpoint file or folder the bundle was exported from "
                                             "(needed when it was a local file; its sha256 is checked)")
    parser.add_argument("--cache-dir", help="open_clip / Hugging Face cache folder to look in")
    parser.add_argument("--offline", action="store_true", help="never try to download the base weights")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    return parser


def build_strip_parser() -> CommandParser:
    parser = CommandParser(
        prog="flora-export strip",
        description="Copy a bundle with only what one kind of device uses: the inference files and the chosen "
                    "trainer backends (e.g. --backend step for a Raspberry Pi or Jetson), with a fresh manifest.",
    )
    add_version_option(parser)
    parser.add_argument("bundle", type=Path, help="the bundle to copy from")
    parser.add_argument("out", type=Path, help="the stripped bundle folder to write")
    parser.add_argument("--backend", required=True, choices=["ort-training", "step", "all"],
                        help="trainer backend(s) to keep")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle folder at OUT")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    return parser


def _setup_logging(quiet: bool):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flora.export").setLevel(logging.WARNING if quiet else logging.INFO)
    # A CUDA build of torch on a machine without a GPU says so at import; it is not news here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger("onnxscript").setLevel(logging.ERROR)  # the step exporter's optimizer notes
    return (lambda _msg: None) if quiet else (lambda msg: print(msg, flush=True))


def merge_main(argv: List[str]) -> int:
    args = build_merge_parser().parse_args(argv)
    say = _setup_logging(args.quiet)
    as_onnx = args.format == "onnx" or (args.format is None and args.out.suffix == ".onnx")
    try:
        from .merge import merge_checkpoint, merge_onnx

        if as_onnx:
            merge_onnx(args.bundle, args.adapter, args.out, say)
        else:
            merge_checkpoint(args.bundle, args.adapter, args.out, args.pretrained, args.cache_dir, args.offline, say)
    except FloraError as exc:
        return report("flora-export merge", exc)
    except OSError as exc:
        return report("flora-export merge", exc, EXIT_BAD_INPUT)
    return 0


def strip_main(argv: List[str]) -> int:
    args = build_strip_parser().parse_args(argv)
    say = _setup_logging(args.quiet)
    backends = ("ort-training", "step") if args.backend == "all" else (args.backend,)
    try:
        from .strip import strip_bundle

        strip_bundle(args.bundle, args.out, backends, args.force, say)
    except FloraError as exc:
        return report("flora-export strip", exc)
    except OSError as exc:
        return report("flora-export strip", exc, EXIT_BAD_INPUT)
    return 0


def options_from_args(parser: CommandParser, args: argparse.Namespace, argv: List[str]) -> ExportOptions:
    """The export's options: the command line's, or with --recipe the recipe's under the options given."""
    backends = ("ort-training", "step") if args.backend == "all" else (args.backend,)
    chosen = {"tower": args.lora_tower, "rank": args.rank, "alpha": args.alpha, "targets": tuple(args.targets),
              "lora_variant": args.lora_variant, "lora_scaling": args.lora_scaling, "lora_init": args.lora_init,
              "optimizer": args.optimizer, "betas": tuple(args.adam_betas), "eps": args.adam_eps,
              "weight_decay": args.weight_decay, "loss": args.loss, "backends": backends}
    if args.recipe:
        given = explicit_options(parser, argv)
        chosen = export_settings(args.recipe, {f: chosen[f] for d, f in RECIPE_OPTIONS.items() if d in given})
    opts = ExportOptions(
        preset=args.model,
        classes=read_classes(args.classes),
        out=args.out,
        prompt=args.prompt,
        pretrained=args.pretrained,
        random_init=args.random_init,
        cache_dir=args.cache_dir,
        offline=args.offline,
        quick_gelu=args.quick_gelu,
        seed=args.seed,
        force=args.force,
        image_encoder_int8=args.image_encoder_int8,
        **chosen,
    )
    return opts


SUBCOMMANDS = {"merge": merge_main, "strip": strip_main}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    say = _setup_logging(args.quiet)
    try:
        opts = options_from_args(parser, args, argv)
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
