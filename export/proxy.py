"""An offline stand-in for pre-trained CLIP: clip-tiny pre-trained contrastively on printed glyphs.

No CLIP weights can be downloaded here, and a random-init CLIP's zero-shot accuracy is chance, so
it cannot show what FLORA does (adapt a model that already knows something to a new domain). This
module makes a model that does: open_clip's CLIP with clip-tiny's architecture, trained from scratch
with CLIP's image-text contrastive objective on printed digits and letters (`glyphs.py`: DejaVu
fonts, distorted, reduced to 8 x 8 with 17 grey levels exactly as scikit-learn's digits were) and
captions from prompt templates ("a photo of a seven.", "the digit 7", "a drawing of the letter k").
Its images go through the simulator's own preprocessing (8 x 8 PNG -> bicubic 32 px, open_clip
normalisation). On scikit-learn's *handwritten* digits its zero-shot accuracy is well above chance
but far from perfect: printed and handwritten digits differ, and fine-tuning LoRA closes the gap.

The checkpoint is an open_clip state dict (safetensors), loaded like any real weights:
`flora-export clip-tiny --pretrained FILE` (the `clip-proxy` preset does this with the cached file).
Pre-training is deterministic for a given torch build, CPU kind and thread count (all three are
recorded beside the file); on 2 cores the default run takes about two minutes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from flora.edge.bundle import Preprocess
from flora.edge.errors import ConfigError
from flora.edge.fileio import atomic_write_json, sha256_file
from flora.edge.preprocess import preprocess_batch

from . import glyphs
from .presets import CLIP_TINY_CONFIG

log = logging.getLogger(__name__)

#: the zero-shot prompt every bundle uses by default; it is one of the training templates
ZERO_SHOT_TEMPLATE = "a photo of a {}."
TEMPLATES = (
    ZERO_SHOT_TEMPLATE,
    "a photo of the {}.",
    "a drawing of a {}.",
    "a printed {}.",
    "a small picture of a {}.",
    "{}",
)
DIGIT_TEMPLATES = ("the digit {}", "the number {}.", "a photo of the number {}.")
LETTER_TEMPLATES = ("the {}", "a photo of the {}.")
#: file name of the checkpoint in a proxy folder, and of the record beside it
CHECKPOINT = "clip-proxy.safetensors"
RECORD = "clip-proxy.json"
FORMAT = 1  # bump when the recipe below changes what is trained


@dataclass(frozen=True)
class ProxyConfig:
    """What is pre-trained; the defaults make the `clip-proxy` preset's weights."""

    steps: int = 600
    batch_size: int = 256
    corpus: int = 12000  # rendered glyphs (each seen steps * batch / corpus = 12.8 times)
    lr: float = 5e-3
    weight_decay: float = 0.1
    warmup: int = 100
    seed: int = 0
    threads: int = 1  # a 64-wide model gains little from more, and one thread keeps the result reproducible

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.corpus, self.threads) < 1 or self.warmup < 0:
            raise ConfigError(f"steps, batch_size, corpus and threads must be >= 1, warmup >= 0: {self}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError(f"lr must be > 0 and weight_decay >= 0: {self}")


# -- captions ----------------------------------------------------------------------------------
def captions(classes: Sequence[glyphs.GlyphClass]) -> Tuple[List[str], np.ndarray]:
    """Every caption of every class (deduplicated, in a fixed order) and the class of each."""
    texts: List[str] = []
    owner: List[int] = []
    for c, cls in enumerate(classes):
        extra = DIGIT_TEMPLATES if cls.is_digit else LETTER_TEMPLATES
        seen = dict.fromkeys(t.format(name) for t in (*TEMPLATES, *extra) for name in (cls.name, *cls.aliases))
        texts += list(seen)
        owner += [c] * len(seen)
    return texts, np.array(owner, dtype=np.int64)


def tokenize(texts: Sequence[str]) -> torch.Tensor:
    """CLIP's tokenizer (shipped inside open_clip), as the bundles' prompts are tokenized."""
    return open_clip.get_tokenizer("ViT-B-32")(list(texts))


def encode_text(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """Normalised text embeddings, with the context cut after the longest end-of-text token.

    The text tower is causal and pooled at the end-of-text token, so the later positions cannot
    change any embedding: the same values as open_clip's `encode_text`, at a fraction of the cost.
    """
    eot = tokens.argmax(dim=-1)
    ctx = int(eot.max()) + 1
    x = model.token_embedding(tokens[:, :ctx]) + model.positional_embedding[:ctx]
    x = model.transformer(x, attn_mask=model.attn_mask[:ctx, :ctx])
    x = model.ln_final(x)[torch.arange(x.shape[0]), eot] @ model.text_projection
    return F.normalize(x, dim=-1)


# -- images ------------------------------------------------------------------------------------
def proxy_preprocess() -> Preprocess:
    """clip-tiny's eval transform: 32 px bicubic (shortest side), OpenAI's mean and std."""
    return Preprocess(image_size=int(CLIP_TINY_CONFIG["vision_cfg"]["image_size"]),
                      mean=tuple(open_clip.OPENAI_DATASET_MEAN), std=tuple(open_clip.OPENAI_DATASET_STD),
                      interpolation="bicubic", resize_mode="shortest")


def pixels_of(cells: np.ndarray) -> torch.Tensor:
    """Glyph cell grids -> the model's input, through the simulator's own path (8 x 8 PNG values,
    then `edge.preprocess`, the agents' open_clip-exact transform)."""
    return torch.from_numpy(preprocess_batch(glyphs.as_grey_images(cells), proxy_preprocess()))


# -- the objective -----------------------------------------------------------------------------
def multi_positive_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss where an image may match several captions of the batch (and back).

    CLIP's loss takes row i's only positive to be column i; here a batch holds many images of one
    class and many captions of it, so every same-class pair is a positive: the loss is
    -log(softmax mass on the positives), averaged over images and over captions.
    """
    masked = logits.masked_fill(~positive, float("-inf"))
    rows = torch.logsumexp(logits, dim=1) - torch.logsumexp(masked, dim=1)
    cols = torch.logsumexp(logits, dim=0) - torch.logsumexp(masked, dim=0)
    return 0.5 * (rows.mean() + cols.mean())


def lr_at(step: int, cfg: ProxyConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))


# -- pre-training ------------------------------------------------------------------------------
def new_model(seed: int) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(**CLIP_TINY_CONFIG)


def pretrain(cfg: ProxyConfig, say: Callable[[str], None] = log.info,
             evaluate: Optional[Callable[[CLIP], float]] = None) -> Tuple[CLIP, Dict]:
    """Train clip-tiny from scratch on the glyph corpus; (the model in eval mode, facts about the run)."""
    torch.set_num_threads(cfg.threads)
    classes = glyphs.glyph_classes()
    t0 = time.perf_counter()
    cells, labels = glyphs.corpus(cfg.corpus, cfg.seed, classes)
    images = pixels_of(cells)
    texts, owner = captions(classes)
    tokens = tokenize(texts)
    by_class = [np.flatnonzero(owner == c) for c in range(len(classes))]
    say(f"proxy corpus: {len(images)} glyphs of {len(classes)} classes, {len(texts)} captions "
        f"({time.perf_counter() - t0:.1f} s)")
    model = new_model(cfg.seed)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))  # CLIP's starting temperature
    # The 49,408 x 64 token table stays at its seeded random values: a few dozen of its rows are ever
    # used, and random 64-d rows are nearly orthogonal, so the towers learn on top of them.
    model.token_embedding.weight.requires_grad_(False)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in trained if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng(cfg.seed + 1)
    labels_t = torch.from_numpy(labels)
    model.train()
    t1 = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = rng.integers(0, len(images), size=cfg.batch_size)
        chosen = np.array([by_class[c][rng.integers(len(by_class[c]))] for c in labels[idx]])
        unique, _ = np.unique(chosen, return_inverse=True)
        img = F.normalize(model.encode_image(images[idx]), dim=-1)
        txt = encode_text(model, tokens[unique])
        logits = model.logit_scale.exp() * img @ txt.t()
        positive = labels_t[idx][:, None] == torch.from_numpy(owner[unique])[None, :]
        loss = multi_positive_loss(logits, positive)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100.0))
        if (step + 1) % max(1, cfg.steps // 6) == 0 or step + 1 == cfg.steps:
            extra = f", zero-shot {evaluate(model):.3f}" if evaluate is not None else ""
            say(f"proxy step {step + 1}/{cfg.steps}: loss {loss.item():.3f}, logit scale "
                f"{model.logit_scale.exp().item():.1f}{extra} ({time.perf_counter() - t1:.0f} s)")
            model.train()
    model.eval()
    info = {"seconds": round(time.perf_counter() - t0, 1), "final_loss": float(loss.item()),
            "classes": len(classes), "captions": len(texts)}
    return model, info


@torch.no_grad()
def zero_shot_accuracy(model: CLIP, pixels: torch.Tensor, labels: np.ndarray,
                       names: Sequence[str] = glyphs.DIGIT_NAMES, template: str = ZERO_SHOT_TEMPLATE) -> float:
    """Zero-shot accuracy on preprocessed digits (`pixels_of`) with one prompt per class, as a bundle scores them."""
    was_training = model.training
    model.eval()
    txt = encode_text(model, tokenize([template.format(n) for n in names]))
    img = F.normalize(model.encode_image(pixels), dim=-1)
    model.train(was_training)
    return float((img @ txt.t()).argmax(dim=1).eq(torch.from_numpy(np.asarray(labels))).double().mean())


def sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits as cell grids (uint8, 0..16) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.uint8), d.target.astype(np.int64)


# -- the cached checkpoint ---------------------------------------------------------------------
def default_dir() -> Path:
    """Where the `clip-proxy` preset looks: $FLORA_PROXY_DIR, else $XDG_CACHE_HOME/flora-edge/proxy."""
    if os.environ.get("FLORA_PROXY_DIR"):
        return Path(os.environ["FLORA_PROXY_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "flora-edge" / "proxy"


def wanted_record(cfg: ProxyConfig) -> Dict:
    """What a cached checkpoint must have been made with to be reused."""
    return {"format": FORMAT, "config": asdict(cfg), "torch": torch.__version__, "open_clip": open_clip.__version__}


def cached(folder: Path, cfg: ProxyConfig) -> Optional[Path]:
    """The checkpoint in `folder` if its record matches `cfg` and this torch/open_clip and its hash is right."""
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    want = wanted_record(cfg)
    path = folder / CHECKPOINT
    if {k: record.get(k) for k in want} != want or not path.is_file():
        return None
    return path if sha256_file(path) == record.get("sha256") else None


def build(folder: Path, cfg: ProxyConfig = ProxyConfig(), say: Callable[[str], None] = log.info,
          force: bool = False) -> Path:
    """The proxy checkpoint in `folder`: reused if it was made with `cfg` here, else pre-trained and written."""
    from safetensors.torch import save_file

    folder = Path(folder)
    found = None if force else cached(folder, cfg)
    if found is not None:
        say(f"proxy checkpoint {found} is up to date")
        return found
    cells, labels = sklearn_digits()
    pixels = pixels_of(cells)
    model, info = pretrain(cfg, say, evaluate=lambda m: zero_shot_accuracy(m, pixels, labels))
    zero_shot = zero_shot_accuracy(model, pixels, labels)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CHECKPOINT}.tmp-{os.getpid()}"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # one metadata key: safetensors writes a metadata map in hash order, so two keys can swap between runs
    save_file(state, str(tmp), metadata={"format": "flora-clip-proxy"})
    os.replace(tmp, folder / CHECKPOINT)
    record = {**wanted_record(cfg), "sha256": sha256_file(folder / CHECKPOINT), "architecture": "clip-tiny",
              "zero_shot_sklearn_digits": round(zero_shot, 4), "cpu": _cpu_name(), **info}
    atomic_write_json(folder / RECORD, record)
    say(f"proxy checkpoint written to {folder / CHECKPOINT}: zero-shot {zero_shot:.3f} on scikit-learn's "
        f"1797 handwritten digits, {info['seconds']:.0f} s")
    return folder / CHECKPOINT


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
