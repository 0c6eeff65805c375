"""What an export is asked to do, checked before torch loads: the options, the class list, the prompt
template, the LoRA layout, the backends and the output folder (flora-export's argument errors and
--help never import torch; export_bundle checks the same again)."""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from flora.edge import bundle as B
from flora.edge.errors import ConfigError, FloraError
from flora.edge.ort import has_training_api

from .presets import Preset, get_preset

DEFAULT_PROMPT = "a photo of a {}."
QKV = ("q", "k", "v")
VARIANTS = ("lora", "ffa")
#: how the LoRA update is scaled: alpha/rank (PEFT's, the default) or alpha itself (FLORA's authors' code)
SCALINGS = ("alpha/rank", "alpha")
#: how A starts: Kaiming-uniform as nn.Linear (PEFT's, the default) or N(0, 1)/sqrt(rank) (FLORA's authors' code)
INITS = ("kaiming", "gaussian")
#: the training loss: cross-entropy over the class-prompt head, or CLIP's symmetric image-text contrastive loss
LOSSES = ("ce", "contrastive")
#: adamw: decoupled weight decay (torch.optim.AdamW); adam: L2 weight decay added to the gradient (torch.optim.Adam)
OPTIMIZERS = ("adamw", "adam")
ALL_TARGETS = ("q", "k", "v", "out", "fc", "proj")
DEFAULT_TARGETS = ("q", "k", "v", "out")


class ExportError(FloraError, RuntimeError):
    """The export cannot run with these inputs (nothing is left behind)."""


@dataclass(frozen=True)
class LoraSpec:
    tower: str  # "text", "vision" or "both"
    rank: int = 8
    alpha: float = 16.0
    targets: Tuple[str, ...] = DEFAULT_TARGETS
    variant: str = "lora"  # "lora" (A and B trained) or "ffa" (A frozen and shared, B trained)
    scaling: str = "alpha/rank"  # or "alpha": the update is alpha * B A
    init: str = "kaiming"  # or "gaussian": A ~ N(0, 1)/sqrt(rank)

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ConfigError(f"LoRA scaling must be one of {list(SCALINGS)}, not {self.scaling!r}")
        if self.init not in INITS:
            raise ConfigError(f"LoRA init must be one of {list(INITS)}, not {self.init!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"LoRA variant must be one of {list(VARIANTS)}, not {self.variant!r}")
        if self.tower not in ("text", "vision", "both"):
            raise ConfigError(f"LoRA tower must be text, vision or both, not {self.tower!r}")
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be > 0, got {self.alpha}")
        bad = [t for t in self.targets if t not in ALL_TARGETS]
        if bad or not self.targets:
            unknown = f" (unknown: {', '.join(map(repr, bad))})" if bad else ""
            raise ConfigError(
                f"LoRA targets {list(self.targets)}{unknown} must be a non-empty subset of {list(ALL_TARGETS)}"
            )
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"LoRA targets {list(self.targets)} repeat an entry")

    @property
    def scale(self) -> float:
        return self.alpha if self.scaling == "alpha" else self.alpha / self.rank

    @property
    def towers(self) -> Tuple[str, ...]:
        return ("text", "vision") if self.tower == "both" else (self.tower,)

    @property
    def ordered_targets(self) -> Tuple[str, ...]:
        return tuple(t for t in ALL_TARGETS if t in self.targets)


@dataclass
class ExportOptions:
    preset: str
    classes: List[str]
    out: Path
    prompt: str = DEFAULT_PROMPT
    tower: str = "text"
    rank: int = 8
    alpha: float = 16.0
    targets: Tuple[str, ...] = DEFAULT_TARGETS
    lora_variant: str = "lora"  # "ffa": FFA-LoRA, A frozen (seeded by `seed`) and only B trained
    pretrained: Optional[str] = None
    random_init: bool = False
    cache_dir: Optional[str] = None
    offline: bool = False
    quick_gelu: Optional[bool] = None
    seed: int = 0
    backends: Tuple[str, ...] = ("ort-training", "step")  # both: the bundle trains on any device
    weight_decay: float = 0.0
    force: bool = False
    image_encoder_int8: bool = False  # also write image_encoder_int8.onnx (text tower only)
    lora_scaling: str = "alpha/rank"
    lora_init: str = "kaiming"
    loss: str = "ce"
    optimizer: str = "adamw"
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    #: {"name", "settings", "training", "overridden"} of the recipe the options came from (flora.export.recipes)
    recipe: Optional[Dict] = None


@dataclass(frozen=True)
class CheckedExport:
    """An export's inputs once checked (what the pipeline's stages build from)."""

    preset: Preset
    classes: List[str]
    template: str
    spec: LoraSpec
    backends: Tuple[str, ...]
    out: Path


def check_export(opts: ExportOptions) -> CheckedExport:
    """Every check that needs neither torch nor the weights; ExportError / ConfigError say what is wrong."""
    preset = get_preset(opts.preset)
    classes = check_classes(opts.classes)
    template = check_template(opts.prompt)
    spec = LoraSpec(opts.tower, opts.rank, opts.alpha, tuple(opts.targets), opts.lora_variant, opts.lora_scaling,
                    opts.lora_init)
    check_training(opts)
    backends = tuple(dict.fromkeys(opts.backends))
    unknown = [b for b in backends if b not in B.BACKENDS]
    if unknown or not backends:
        raise ExportError(f"backends {list(backends)} must be a non-empty subset of {list(B.BACKENDS)}")
    if opts.image_encoder_int8 and spec.tower != "text":
        raise ExportError("--image-encoder-int8 quantizes the frozen image encoder of --lora-tower text; with LoRA "
                          f"in the {spec.tower} tower(s) the image tower is trained and stays float")
    if "ort-training" in backends and opts.optimizer == "adam" and opts.weight_decay != 0:
        raise ExportError("the ort-training optimizer graph is AdamW (decoupled weight decay); Adam with L2 weight "
                          f"decay {opts.weight_decay:g} (--optimizer adam) needs --backend step, or --optimizer adamw, "
                          "or --weight-decay 0")
    if "ort-training" in backends and not has_training_api():
        raise ExportError("the ort-training backend needs onnxruntime-training on this machine; install the "
                          "'export' extra or use --backend step")
    out = Path(opts.out)
    check_output(out, opts.force)
    return CheckedExport(preset, classes, template, spec, backends, out)


def check_training(opts: ExportOptions) -> None:
    """The loss and the optimizer's settings."""
    if opts.loss not in LOSSES:
        raise ConfigError(f"loss must be one of {list(LOSSES)}, not {opts.loss!r}")
    if opts.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {list(OPTIMIZERS)}, not {opts.optimizer!r}")
    betas = tuple(opts.betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"Adam betas must be two numbers in [0, 1), got {list(betas)}")
    if not opts.eps > 0:
        raise ConfigError(f"Adam eps must be > 0, got {opts.eps}")
    if opts.weight_decay < 0:
        raise ConfigError(f"weight decay must be >= 0, got {opts.weight_decay}")


def read_classes(path: Path) -> List[str]:
    """One class name per line; blank lines and lines starting with '#' are skipped.

    The list is checked as by `check_classes`, and errors name the file's own line numbers.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot read class list {path}: {exc}") from exc
    entries = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    kept = [(n, name) for n, name in entries if name and not name.startswith("#")]
    return check_classes([name for _, name in kept], lines=[n for n, _ in kept])


def check_classes(classes: Sequence[str], lines: Optional[Sequence[int]] = None) -> List[str]:
    """The stripped class names, or ExportError if the list is empty, repeats a name or has a name
    that cannot be a folder name. `lines` are the names' line numbers in a file (default: positions)."""
    names = [c.strip() for c in classes]
    if not names:
        raise ExportError("the class list is empty: give one class name per line")
    where = "lines" if lines is not None else "entries"
    numbers = list(lines) if lines is not None else list(range(1, len(names) + 1))
    first: Dict[str, int] = {}
    dupes = []
    for number, name in zip(numbers, names):
        if name in first:
            dupes.append(f"{name!r} ({where} {first[name]} and {number})")
        first.setdefault(name, number)
    if dupes:
        raise ExportError(f"the class list repeats {', '.join(dupes)}")
    bad = [n for n in names if "/" in n or n in (".", "..")]
    if bad:
        raise ExportError(f"class names {bad} cannot be folder names on a device; rename them")
    return names


_SAMPLE_CLASS = "golden retriever"


def check_template(template: str) -> str:
    """`template` if it has exactly one plain `{}` (other braces doubled) and formats a sample name."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
        ok = fields == [("", "", None)] and _SAMPLE_CLASS in template.format(_SAMPLE_CLASS)
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        raise ExportError(
            f"prompt template {template!r} is not a valid template ({exc}); it must contain exactly one "
            "'{}' for the class name, and write a literal brace as '{{' or '}}'"
        ) from exc
    if not ok:
        raise ExportError(
            f"prompt template {template!r} must contain exactly one '{{}}' for the class name and no other "
            "'{...}' field; write a literal brace as '{{' or '}}'"
        )
    return template


def check_output(out: Path, force: bool) -> None:
    """Fail before any heavy work if the bundle cannot be written (or must not be replaced)."""
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.exists():
        check_replaceable(out)
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write the bundle: {probe} is not a writable folder")


def check_replaceable(folder: Path) -> None:
    """--force replaces an empty folder or a FLORA bundle, never any other folder."""
    if any(folder.iterdir()) and not B.is_bundle(folder):
        raise ExportError(
            f"{folder} is not a FLORA bundle (no {B.MANIFEST} with format {B.FORMAT!r}) and not empty; "
            "--force replaces only bundles: choose another --out or remove the folder yourself"
        )
