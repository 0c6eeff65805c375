"""Build an open_clip model with its base weights: a local file or folder, open_clip's cache, or random init.

Weight files as users hold them are all read here: safetensors (open_clip's and Hugging Face's
`open_clip_model.safetensors`), torch pickles (`open_clip_pytorch_model.bin`, a plain `torch.save`
state dict, with or without a `state_dict` key or DataParallel's `module.` prefix), OpenAI's
TorchScript archives (`ViT-B-32.pt`), and Hugging Face snapshot folders (the files above plus
`open_clip_config.json`). OpenAI's weights were trained with QuickGELU, which is switched on for
them automatically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import open_clip
import torch
from open_clip import pretrained as oc_pretrained
from open_clip.model import CLIP

from flora.edge.errors import FloraError
from flora.edge.fileio import sha256_file

from .network import endpoint_of, offline_hint, reachable
from .presets import PROXY_TAG, Preset

log = logging.getLogger(__name__)

#: open_clip's own preference among the weight files of a folder (open_clip.factory._find_checkpoint_in_dir)
FOLDER_CHECKPOINTS = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth",
)
FOLDER_CONFIG = "open_clip_config.json"
CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz")
#: keys OpenAI's TorchScript models (and state dicts saved from them) hold besides the weights
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class WeightsError(FloraError, RuntimeError):
    """Pretrained weights were asked for but cannot be found or loaded."""


@dataclass(frozen=True)
class WeightsSource:
    """Where the base weights come from (decided before anything is loaded)."""

    kind: str  # "file", "folder", "open_clip-cache" or "random-init"
    path: Optional[Path]  # the checkpoint file
    tag: Optional[str]
    quick_gelu: Optional[bool]  # what was asked (or the tag's); None: decide from the weights
    seed: Optional[int] = None
    folder: Optional[Path] = None  # a Hugging Face snapshot folder (its open_clip_config.json, if any)

    def describe(self) -> Dict[str, Any]:
        """What the manifest records: names and hashes, never a workstation's absolute path."""
        return {
            "source": self.kind,
            "tag": self.tag,
            "file": self.path.name if self.path else None,
            "folder": self.folder.name if self.folder else None,
            "quick_gelu": bool(self.quick_gelu),
            "seed": self.seed,
        }


@dataclass(frozen=True)
class LoadedWeights:
    """What loading found out: the weights' format, file hash and the QuickGELU actually used."""

    source: WeightsSource
    quick_gelu: bool
    format: Optional[str] = None  # "safetensors", "torch", "torchscript", "big_vision" (None: random init)
    file_sha256: Optional[str] = None
    openai_style: bool = False

    def describe(self) -> Dict[str, Any]:
        d = self.source.describe()
        d.update(quick_gelu=self.quick_gelu, format=self.format, file_sha256=self.file_sha256)
        return d


def _hf_candidates(hf_hub: str) -> Tuple[str, List[str]]:
    """(repo id, filenames open_clip would try, in its order) for a pretrained cfg's `hf_hub` entry."""
    repo_id, filename = os.path.split(hf_hub)  # open_clip's own rule: a trailing '/' means the default name
    filename = filename or oc_pretrained.HF_WEIGHTS_NAME
    names = [*oc_pretrained._get_safe_alternatives(filename), filename]
    return repo_id, names


def _hf_cache_dir(cache_dir: Optional[str]) -> str:
    if cache_dir:
        return cache_dir
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def architecture_tags(architecture: str) -> List[str]:
    return list(open_clip.list_pretrained_tags_by_model(architecture))


def resolve_weights(
    preset: Preset,
    *,
    pretrained: Optional[str],
    random_init: bool,
    cache_dir: Optional[str] = None,
    offline: bool = False,
    quick_gelu: Optional[bool] = None,
    seed: int = 0,
) -> WeightsSource:
    """Decide where the base weights come from, without loading them.

    `pretrained` is a checkpoint file, a Hugging Face snapshot folder, or an open_clip tag (default:
    the preset's tag). A tag is looked up in open_clip's cache first; a download is tried only
    without `offline` and when the hub answers at all (a quick probe, not a minute of retries).
    """
    if random_init:
        return WeightsSource("random-init", None, None, quick_gelu, seed)
    if pretrained is None:
        pretrained = preset.default_pretrained
    if pretrained is None:
        if preset.config is not None:
            return WeightsSource("random-init", None, None, quick_gelu, seed)
        raise WeightsError(
            f"{preset.architecture} needs weights: --pretrained TAG (open_clip's tags for it: "
            f"{', '.join(architecture_tags(preset.architecture)) or 'none'}), --pretrained PATH (a checkpoint file "
            "or a Hugging Face snapshot folder), or --random-init"
        )
    if pretrained == PROXY_TAG:
        pretrained = str(_proxy_checkpoint())
    candidate = Path(pretrained).expanduser()
    if candidate.is_dir():
        return WeightsSource("folder", find_folder_checkpoint(candidate), None, quick_gelu, folder=candidate.resolve())
    if candidate.is_file():
        return WeightsSource("file", candidate.resolve(), None, quick_gelu)
    if os.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES):
        raise WeightsError(f"pretrained checkpoint file {candidate} does not exist")
    if preset.config is not None:
        raise WeightsError(f"{preset.name} has no pretrained tags; pass --pretrained PATH or --random-init")
    cfg = open_clip.get_pretrained_cfg(preset.architecture, pretrained)
    if not cfg:
        raise WeightsError(f"unknown open_clip tag {pretrained!r} for {preset.architecture}; known tags: "
                           f"{architecture_tags(preset.architecture)}")
    tag_quick_gelu = bool(cfg.get("quick_gelu", False))
    if quick_gelu is not None and quick_gelu != tag_quick_gelu:
        log.warning("open_clip's %s/%s weights were trained %s QuickGELU, but %s was given: the exported model "
                    "will not compute what the weights were trained for", preset.architecture, pretrained,
                    "with" if tag_quick_gelu else "without", "--quick-gelu" if quick_gelu else "--no-quick-gelu")
    path = _find_cached(cfg, cache_dir)
    if path is None and not offline:
        path = _download(preset, pretrained, cfg, cache_dir)
    if path is None or not path.is_file():
        raise WeightsError(_missing_weights_message(preset, pretrained, cfg, cache_dir, offline))
    return WeightsSource("open_clip-cache", path, pretrained, tag_quick_gelu if quick_gelu is None else quick_gelu)


def _download(preset: Preset, tag: str, cfg: Dict[str, Any], cache_dir: Optional[str]) -> Optional[Path]:
    """Download through open_clip, once a quick probe found the hub reachable; None when it failed."""
    host, port = endpoint_of(cfg)
    ok, why = reachable(host, port)
    if not ok:
        log.warning("%s is not reachable (%s): not downloading %s/%s; %s", host, why, preset.architecture, tag,
                    offline_hint())
        return None
    log.info("weights for %s/%s are not cached; downloading through open_clip", preset.architecture, tag)
    try:
        return Path(oc_pretrained.download_pretrained(cfg, cache_dir=cache_dir))
    except Exception as exc:  # network errors come in many types
        log.warning("download failed: %s", exc)
        return None


def find_folder_checkpoint(folder: Path) -> Path:
    """The weight file of a snapshot folder, in open_clip's order of preference."""
    for name in FOLDER_CHECKPOINTS:
        if (folder / name).is_file():
            return (folder / name).resolve()
    others = sorted(p.name for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
    if len(others) == 1:
        return (folder / others[0]).resolve()
    raise WeightsError(f"{folder} holds no open_clip weight file ({' or '.join(FOLDER_CHECKPOINTS[:3])}"
                       + (f"; several candidates: {others}: pass one with --pretrained FILE" if others else "") + ")")


def _proxy_checkpoint() -> Path:
    """The cached proxy checkpoint (export.proxy), or WeightsError saying how to make it."""
    from . import proxy

    folder = proxy.default_dir()
    path = folder / proxy.CHECKPOINT
    if not path.is_file():
        raise WeightsError(f"the clip-proxy checkpoint {path} has not been made yet: run `flora-proxy` once "
                           "(about two minutes on 2 cores; scripts/setup.sh does it), or pass --pretrained PATH")
    return path


def _find_cached(cfg: Dict[str, Any], cache_dir: Optional[str]) -> Optional[Path]:
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        from huggingface_hub import hf_hub_download

        repo_id, names = _hf_candidates(hf_hub)
        for name in names:
            try:
                return Path(hf_hub_download(repo_id, name, cache_dir=cache_dir, local_files_only=True))
            except Exception:  # LocalEntryNotFoundError and friends: not cached
                continue
    url = cfg.get("url", "")
    if url:
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if target.is_file():
            return target
    return None


def _missing_weights_message(
    preset: Preset, tag: str, cfg: Dict[str, Any], cache_dir: Optional[str], offline: bool
) -> str:
    looked = []
    if cfg.get("hf_hub"):
        repo_id, names = _hf_candidates(cfg["hf_hub"])
        looked.append(f"Hugging Face cache {_hf_cache_dir(cache_dir)}: {repo_id}/{' or '.join(names)}")
    if cfg.get("url"):
        looked.append(f"{Path(cache_dir or '~/.cache/clip') / os.path.basename(cfg['url'])}")
    how = "offline mode, no download tried" if offline else "not downloaded (see above)"
    return (
        f"pretrained weights for {preset.name} ({preset.architecture}, tag {tag!r}) are not available ({how}).\n"
        f"  looked for: {'; '.join(looked)}\n"
        "  provide them with --pretrained PATH (an open_clip checkpoint .safetensors, .bin or .pt, OpenAI's .pt,\n"
        "  or a Hugging Face snapshot folder), or run once with internet access to fill open_clip's cache\n"
        "  (--cache-dir to choose it), or use --random-init"
    )


# -- reading weight files ----------------------------------------------------------------------
def checkpoint_format(path: Path) -> str:
    """"safetensors", "torchscript", "torch" (a pickle) or "big_vision" (.npz), by the file's content."""
    if path.suffix in (".npz", ".npy"):
        return "big_vision"
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path):
        return "safetensors"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if any(n.split("/", 1)[-1].startswith("code/") or n.endswith("/constants.pkl") for n in zf.namelist()):
                return "torchscript"
    return "torch"


def read_state_dict(path: Path, fmt: str) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, as open_clip's `load_state_dict` reads them (plus TorchScript)."""
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif fmt == "torchscript":
            # OpenAI's releases are TorchScript archives: torch.load(weights_only=True) refuses them.
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read {path} as a {fmt} checkpoint: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{path} holds no state dict (a {type(state).__name__})")
    if next(iter(state)).startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def looks_like_openai(fmt: str, state: Dict[str, torch.Tensor]) -> bool:
    """OpenAI's CLIP weights: a TorchScript archive, or a state dict saved from one."""
    return fmt == "torchscript" or any(k in state for k in OPENAI_EXTRA_KEYS)


def load_state_into(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: Path) -> None:
    """open_clip's load_checkpoint after the file is read: its conversions, then a strict load."""
    from open_clip.factory import convert_state_dict, resize_pos_embed, resize_text_pos_embed
    from open_clip.model import convert_to_custom_text_state_dict

    state = {k: v for k, v in state.items() if k not in OPENAI_EXTRA_KEYS}
    try:
        state = convert_state_dict(model, state)
        if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
            state = convert_to_custom_text_state_dict(state)
        for key in ("logit_scale", "logit_bias"):
            own = getattr(model, key, None)
            if key in state and own is not None and own.ndim != state[key].ndim:
                state[key] = state[key].reshape(own.shape)
        if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
            state["logit_bias"] = torch.zeros_like(state["logit_scale"])
        resize_pos_embed(state, model)
        resize_text_pos_embed(state, model)
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise WeightsError(f"cannot load {path} into the model: {exc}") from exc


# -- building the model ------------------------------------------------------------------------
def folder_config(folder: Optional[Path]) -> Optional[Dict[str, Any]]:
    """The snapshot folder's open_clip_config.json ({model_cfg, preprocess_cfg}), or None."""
    if folder is None or not (folder / FOLDER_CONFIG).is_file():
        return None
    try:
        config = json.loads((folder / FOLDER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read {folder / FOLDER_CONFIG}: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise WeightsError(f"{folder / FOLDER_CONFIG} has no model_cfg")
    return config


def load_base(preset: Preset, weights: WeightsSource,
              expect_file_sha256: Optional[str] = None) -> Tuple[CLIP, LoadedWeights]:
    """The open_clip model in eval mode, every parameter frozen, and what loading found out.

    With `expect_file_sha256` a checkpoint file whose sha256 differs is refused before it is read.
    """
    state, fmt, digest = None, None, None
    if weights.path is not None:
        fmt = checkpoint_format(weights.path)
        digest = sha256_file(weights.path)
        if expect_file_sha256 and digest != expect_file_sha256:
            raise WeightsError(f"{weights.path} is not the checkpoint the bundle was exported from: its sha256 is "
                               f"{digest[:16]}…, the manifest records {expect_file_sha256[:16]}…")
        if fmt != "big_vision":
            state = read_state_dict(weights.path, fmt)
    openai = state is not None and looks_like_openai(fmt, state)
    quick_gelu = _decide_quick_gelu(weights, openai)
    if weights.kind == "random-init":
        torch.manual_seed(weights.seed or 0)
    model = _create(preset, weights, quick_gelu)
    if state is not None:
        load_state_into(model, state, weights.path)
    elif fmt == "big_vision":
        from open_clip.factory import load_checkpoint

        try:
            load_checkpoint(model, str(weights.path))
        except Exception as exc:
            raise WeightsError(f"cannot load {weights.path} into the model: {exc}") from exc
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    effective = quick_gelu or _config_quick_gelu(preset, weights)
    return model, LoadedWeights(weights, effective, fmt, digest, openai)


def build_model(preset: Preset, weights: WeightsSource) -> CLIP:
    """The open_clip model in eval mode, every parameter frozen."""
    return load_base(preset, weights)[0]


def _decide_quick_gelu(weights: WeightsSource, openai: bool) -> bool:
    if weights.quick_gelu is None:
        if openai:
            log.info("%s looks like OpenAI's weights: using QuickGELU, as they were trained", weights.path.name)
        return openai
    if openai and not weights.quick_gelu:
        log.warning("%s looks like OpenAI's weights (trained with QuickGELU) but --no-quick-gelu was given: the "
                    "exported model will not compute what the weights were trained for", weights.path.name)
    return bool(weights.quick_gelu)


def _config_quick_gelu(preset: Preset, weights: WeightsSource) -> bool:
    """QuickGELU the model config itself asks for (e.g. `ViT-B-32-quickgelu`, a folder's config)."""
    config = folder_config(weights.folder)
    if config is not None:
        return bool(config["model_cfg"].get("quick_gelu", False))
    if preset.config is not None:
        return bool(preset.config.get("quick_gelu", False))
    return bool((open_clip.get_model_config(preset.architecture) or {}).get("quick_gelu", False))


def _create(preset: Preset, weights: WeightsSource, quick_gelu: bool) -> CLIP:
    """The architecture with fresh weights: a preset's config, a folder's open_clip_config.json, or open_clip's."""
    if preset.config is not None and folder_config(weights.folder) is None:
        cfg = dict(preset.config)
        if quick_gelu:
            cfg["quick_gelu"] = True
        return CLIP(**cfg)
    name = f"local-dir:{weights.folder}" if folder_config(weights.folder) is not None else preset.architecture
    logging.disable(logging.WARNING)  # open_clip warns on the root logger that no weights were loaded: none are yet
    try:
        return open_clip.create_model(name, pretrained=None, load_weights=False, force_quick_gelu=quick_gelu,
                                      pretrained_text=False, pretrained_image=False)
    except Exception as exc:
        raise WeightsError(f"cannot build {name}: {exc}") from exc
    finally:
        logging.disable(logging.NOTSET)


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's tensors (name, dtype, shape, bytes) in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()


def preprocess_config(model: CLIP, weights: WeightsSource, preset: Preset) -> Dict[str, Any]:
    """Image size, mean/std and resize rule of open_clip's eval transform for this model and weights."""
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    pp: Dict[str, Any] = {"mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD,
                          "interpolation": "bicubic", "resize_mode": "shortest"}
    own = open_clip.get_model_preprocess_cfg(model) if preset.config is None else {}
    pp.update({k: v for k, v in own.items() if k in pp and v is not None})
    if weights.tag and preset.config is None:
        cfg = open_clip.get_pretrained_cfg(preset.architecture, weights.tag)
        pp.update({k: cfg[k] for k in pp if cfg.get(k) is not None})
    config = folder_config(weights.folder)
    if config is not None:
        pp.update({k: v for k, v in config.get("preprocess_cfg", {}).items() if k in pp and v is not None})
    return {
        "image_size": size,
        "mean": [float(x) for x in pp["mean"]],
        "std": [float(x) for x in pp["std"]],
        "interpolation": str(pp["interpolation"]),
        "resize_mode": str(pp["resize_mode"]),
    }
