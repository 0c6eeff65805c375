"""The bundle: the folder `flora-export` writes and every other part reads.

A bundle holds the ONNX models, the initial adapter and `manifest.json`, which describes all of
it. This module loads and validates manifests; it never imports torch. docs/bundle.md is the
human-readable description of the same format.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import FloraError
from .fileio import PathLike, sha256_file

FORMAT = "flora-bundle"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
IMAGE_ENCODER = "image_encoder.onnx"
#: optional: the image encoder with int8 weights (ONNX Runtime dynamic quantization), `--image-encoder-int8`
IMAGE_ENCODER_INT8 = "image_encoder_int8.onnx"
INFERENCE_MODEL = "inference_model.onnx"
TRAIN_STEP_MODEL = "train_step.onnx"
ADAPTER = "adapter.safetensors"
#: FFA-LoRA bundles: the frozen A tensors (plain safetensors, by `<name>.lora_A`), constants of the graphs too
FROZEN_FACTORS = "frozen_factors.safetensors"

TOWERS = ("text", "vision", "both")
LORA_VARIANTS = ("lora", "ffa")
LORA_SCALINGS = ("alpha/rank", "alpha")
LORA_INITS = ("kaiming", "gaussian")
#: "ce": cross-entropy over the class-prompt head; "contrastive": CLIP's symmetric image-text loss
LOSSES = ("ce", "contrastive")
#: "adamw": decoupled weight decay (torch.optim.AdamW); "adam": L2 decay added to the gradient (torch.optim.Adam)
OPTIMIZERS = ("adamw", "adam")
TARGETS = ("q", "k", "v", "out", "fc", "proj")
BACKENDS = ("ort-training", "step")

#: Files each backend needs on top of the always-present ones.
BACKEND_FILES: Dict[str, Tuple[str, ...]] = {
    "ort-training": (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT),
    "step": (TRAIN_STEP_MODEL,),
}
ALWAYS_FILES = (INFERENCE_MODEL, ADAPTER)


class BundleError(FloraError, ValueError):
    """A bundle or manifest is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class TensorSpec:
    """One trainable LoRA tensor: its name in adapters and graphs, shape and dtype."""

    name: str
    shape: Tuple[int, ...]
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d.get("dtype", "float32")))


@dataclass(frozen=True)
class LoraConfig:
    tower: str
    rank: int
    alpha: float
    targets: Tuple[str, ...]
    #: "lora": A and B trained and sent; "ffa" (FFA-LoRA): A frozen and shared (FROZEN_FACTORS), only B trained
    variant: str = "lora"
    #: ffa: the seed the frozen A tensors were drawn with
    frozen_seed: Optional[int] = None
    #: "alpha/rank": the update is (alpha/rank) B A; "alpha": alpha B A (FLORA's authors' code)
    scaling: str = "alpha/rank"
    #: how A started: "kaiming" (uniform, as nn.Linear) or "gaussian" (N(0, 1)/sqrt(rank))
    init: str = "kaiming"

    @property
    def scale(self) -> float:
        return self.alpha if self.scaling == "alpha" else self.alpha / self.rank

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> LoraConfig:
        lora = cls(tower=str(d["tower"]), rank=int(d["rank"]), alpha=float(d["alpha"]), targets=tuple(d["targets"]),
                   variant=str(d.get("variant", "lora")),
                   frozen_seed=None if d.get("frozen_seed") is None else int(d["frozen_seed"]),
                   scaling=str(d.get("scaling", "alpha/rank")), init=str(d.get("init", "kaiming")))
        if lora.scaling not in LORA_SCALINGS:
            raise BundleError(f"manifest lora.scaling {lora.scaling!r} is not one of {LORA_SCALINGS}")
        if lora.init not in LORA_INITS:
            raise BundleError(f"manifest lora.init {lora.init!r} is not one of {LORA_INITS}")
        if lora.variant not in LORA_VARIANTS:
            raise BundleError(f"manifest lora.variant {lora.variant!r} is not one of {LORA_VARIANTS}")
        if lora.tower not in TOWERS:
            raise BundleError(f"manifest lora.tower {lora.tower!r} is not one of {TOWERS}")
        unknown = sorted(set(lora.targets) - set(TARGETS))
        if unknown:
            raise BundleError(f"manifest lora.targets has unknown entries {unknown}; known: {TARGETS}")
        return lora


@dataclass(frozen=True)
class Preprocess:
    """open_clip's eval transform: resize the shortest side (bicubic), center crop, normalise."""

    image_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> Preprocess:
        return cls(
            image_size=int(d["image_size"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bicubic")),
            resize_mode=str(d.get("resize_mode", "shortest")),
        )


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer of the training graphs: `adamw` (as baked into the ORT optimizer graph, whose weight decay
    is fixed there; lr is not) or `adam` (torch.optim.Adam: L2 weight decay added to the gradient; step only)."""

    name: str = "adamw"
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> OptimizerConfig:
        if str(d.get("name", "adamw")) not in OPTIMIZERS:
            raise BundleError(f"manifest optimizer.name {d.get('name')!r} is not one of {OPTIMIZERS}")
        return cls(
            name=str(d.get("name", "adamw")),
            betas=tuple(float(b) for b in d.get("betas", (0.9, 0.999))),  # type: ignore[arg-type]
            eps=float(d.get("eps", 1e-8)),
            weight_decay=float(d.get("weight_decay", 0.0)),
        )


@dataclass(frozen=True)
class Manifest:
    model_id: str
    preset: str
    architecture: str
    pretrained: Dict[str, Any]
    base_weights_sha256: str
    lora: LoraConfig
    trainable: Tuple[TensorSpec, ...]
    classes: Tuple[str, ...]
    prompt_template: str
    text_context: int
    preprocess: Preprocess
    input_kind: str  # "features" (text tower mode) or "pixels"
    feature_dim: int
    logit_scale: float
    backends: Tuple[str, ...]
    optimizer: OptimizerConfig
    files: Dict[str, str]  # file name -> sha256
    #: ONNX file -> the external data files its weights live in (graphs over protobuf's 2 GB limit)
    external_data: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    onnx: Dict[str, Any] = field(default_factory=dict)
    created: Dict[str, Any] = field(default_factory=dict)
    #: the training loss of the training graphs (LOSSES)
    loss: str = "ce"
    #: the recipe the export came from (flora.export.recipes): name, settings, training, overridden; None: options
    recipe: Optional[Dict[str, Any]] = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # -- derived ---------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def trainable_names(self) -> List[str]:
        return [t.name for t in self.trainable]

    @property
    def spec_by_name(self) -> Dict[str, TensorSpec]:
        return {t.name: t for t in self.trainable}

    @property
    def adapter_numel(self) -> int:
        return sum(t.numel for t in self.trainable)

    @property
    def needs_image_encoder(self) -> bool:
        return self.input_kind == "features"

    def input_shape(self, batch: int) -> Tuple[int, ...]:
        """Shape of one training batch's input tensor."""
        if self.input_kind == "features":
            return (batch, self.feature_dim)
        return (batch, 3, self.preprocess.image_size, self.preprocess.image_size)

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["trainable"] = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.trainable]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> Manifest:
        """A parsed and checked manifest; BundleError says what is wrong with `d`."""
        try:
            return cls._from_dict(d)
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest is malformed: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def _from_dict(cls, d: Dict[str, Any]) -> Manifest:
        _check_format(d)
        return cls(
            model_id=str(d["model_id"]),
            preset=str(d["preset"]),
            architecture=str(d["architecture"]),
            pretrained=dict(d.get("pretrained", {})),
            base_weights_sha256=str(d["base_weights_sha256"]),
            lora=LoraConfig.from_dict(d["lora"]),
            trainable=_trainable_from(d["trainable"]),
            classes=_classes_from(d["classes"]),
            prompt_template=str(d["prompt_template"]),
            text_context=int(d["text_context"]),
            preprocess=Preprocess.from_dict(d["preprocess"]),
            input_kind=_one_of(str(d["input_kind"]), ("features", "pixels"), "input_kind"),
            feature_dim=int(d["feature_dim"]),
            logit_scale=float(d["logit_scale"]),
            backends=_backends_from(d["backends"]),
            optimizer=OptimizerConfig.from_dict(d.get("optimizer", {})),
            files={str(k): str(v) for k, v in d["files"].items()},
            external_data=_external_data_from(d.get("external_data", {})),
            onnx=dict(d.get("onnx", {})),
            created=dict(d.get("created", {})),
            loss=_one_of(str(d.get("loss", "ce")), LOSSES, "loss"),
            recipe=None if d.get("recipe") is None else dict(d["recipe"]),
        )


def _check_format(d: Dict[str, Any]) -> None:
    if d.get("format") != FORMAT:
        raise BundleError(f"not a FLORA bundle manifest: format is {d.get('format')!r}, expected {FORMAT!r}")
    version = d.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"unsupported bundle format_version {version!r}; this build reads {FORMAT_VERSION}")


def _trainable_from(entries: Sequence[Dict[str, Any]]) -> Tuple[TensorSpec, ...]:
    trainable = tuple(TensorSpec.from_dict(t) for t in entries)
    if not trainable:
        raise BundleError("manifest lists no trainable tensors")
    names = [t.name for t in trainable]
    if len(set(names)) != len(names):
        raise BundleError("manifest lists a trainable tensor twice")
    return trainable


def _classes_from(entries: Sequence[Any]) -> Tuple[str, ...]:
    classes = tuple(str(c) for c in entries)
    if not classes:
        raise BundleError("manifest has an empty class list")
    return classes


def _backends_from(entries: Sequence[Any]) -> Tuple[str, ...]:
    backends = tuple(entries)
    if not backends or set(backends) - set(BACKENDS):
        raise BundleError(f"manifest backends {list(backends)} must be a non-empty subset of {BACKENDS}")
    return backends


def _one_of(value: str, allowed: Sequence[str], key: str) -> str:
    if value not in allowed:
        raise BundleError(f"manifest {key} {value!r} must be {' or '.join(map(repr, allowed))}")
    return value


def _plain_file_name(name: str) -> str:
    """`name` if it names a file directly inside the bundle folder, else BundleError."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise BundleError(f"manifest names {name!r}, which is not a file name inside the bundle folder")
    return name


def _external_data_from(d: Dict[str, Any]) -> Dict[str, Tuple[str, ...]]:
    if not isinstance(d, dict):
        raise BundleError("manifest external_data must map ONNX file names to lists of data files")
    return {_plain_file_name(str(k)): tuple(_plain_file_name(str(f)) for f in v) for k, v in d.items()}


def required_files(input_kind: str, backends: Sequence[str], variant: str = "lora") -> List[str]:
    """The files a bundle with these backends must hold (besides the manifest)."""
    files = list(ALWAYS_FILES)
    if input_kind == "features":
        files.append(IMAGE_ENCODER)
    if variant == "ffa":
        files.append(FROZEN_FACTORS)
    for backend in backends:
        files.extend(BACKEND_FILES[backend])
    return files


@dataclass(frozen=True)
class Bundle:
    """A bundle folder on disk with its parsed manifest."""

    root: Path
    manifest: Manifest

    def path(self, name: str) -> Path:
        return self.root / name

    def has(self, backend: str) -> bool:
        return backend in self.manifest.backends


def is_bundle(path: PathLike) -> bool:
    """Whether `path` is a folder with a manifest.json whose `format` is flora-bundle (nothing else is read)."""
    manifest = Path(path) / MANIFEST
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def files_to_check(manifest: Manifest, backends: Optional[Sequence[str]] = None) -> List[str]:
    """The files `load_bundle` checks for `backends` (default: all the bundle's): the always-present
    ones, the image encoder in `features` mode (and its int8 version when the bundle has one), each
    backend's files, and their external data files."""
    needed = required_files(manifest.input_kind, backends if backends is not None else manifest.backends,
                            manifest.lora.variant)
    if IMAGE_ENCODER_INT8 in manifest.files:  # optional, verified like the others when the bundle has it
        needed.append(IMAGE_ENCODER_INT8)
    return needed + [data for name in needed for data in manifest.external_data.get(name, ())]


def load_manifest(path: PathLike) -> Manifest:
    """Parse a manifest.json file (or the manifest of a bundle folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    if not p.is_file():
        raise BundleError(f"no manifest at {p}: is this a bundle written by flora-export?")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read manifest {p}: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"manifest {p} is not a JSON object")
    return Manifest.from_dict(data)


def load_bundle(root: PathLike, verify: bool = True, backends: Optional[Sequence[str]] = None) -> Bundle:
    """Load a bundle folder and check the files of `backends` (default: every backend it holds).

    The files are those of `files_to_check`; each must be listed in the manifest's `files`, and with
    `verify` exist as a regular file whose sha256 matches. A device that runs `step` need not hold
    the ORT training artifacts. Files of other backends, and files the manifest does not list, are
    not looked at.
    """
    root_p = Path(root)
    manifest = load_manifest(root_p)
    needed = files_to_check(manifest, backends)
    missing = [name for name in needed if name not in manifest.files]
    if missing:
        raise BundleError(f"manifest of {root_p} does not list required files {missing}")
    if verify:
        for name in needed:
            verify_file(root_p, manifest, name)
    return Bundle(root_p, manifest)


def verify_file(root: PathLike, manifest: Manifest, name: str) -> None:
    """BundleError unless `root/name` is a regular file listed in the manifest with a matching sha256."""
    fpath = Path(root) / name
    if name not in manifest.files:
        raise BundleError(f"manifest of {root} does not list {name}")
    if not fpath.is_file():
        raise BundleError(f"bundle {root} is missing {name}")
    digest = sha256_file(fpath)
    if digest != manifest.files[name]:
        raise BundleError(
            f"bundle file {fpath} does not match its manifest sha256 "
            f"(have {digest[:12]}…, manifest says {manifest.files[name][:12]}…): "
            "the bundle is corrupt or was modified; export it again"
        )
