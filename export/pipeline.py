"""The export pipeline: open_clip CLIP + LoRA -> a complete bundle folder, written atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch
from safetensors.numpy import save as safetensors_save

from flora.edge import __version__
from flora.edge import adapter as adapter_blob
from flora.edge import bundle as B
from flora.edge.fileio import atomic_write_bytes, current_umask, sha256_file

from . import graphs, lora, onnx_export, ort_artifacts, shared_data
from .loading import LoadedWeights, WeightsSource, load_base, preprocess_config, resolve_weights, state_sha256
from .options import (  # re-exported: the pipeline's inputs and their checks live in options (no torch)
    DEFAULT_PROMPT,
    ExportError,
    ExportOptions,
    LoraSpec,
    check_classes,
    check_export,
    check_output,
    check_replaceable,
    check_template,
    read_classes,
)
from .presets import Preset

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    path: Path
    manifest: B.Manifest
    seconds: Dict[str, float] = field(default_factory=dict)


def lora_identity(spec: LoraSpec, frozen_seed: Optional[int]) -> Dict:
    """The LoRA part of a model's identity; FFA-LoRA adds its variant and the seed of its frozen A tensors
    (other A, other model), the plain variant keeps the identity bundles had before variants existed."""
    identity = {"tower": spec.tower, "rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.ordered_targets)}
    if spec.variant != "lora":
        identity.update(variant=spec.variant, frozen_seed=frozen_seed)
    if spec.scaling != "alpha/rank":  # the same tensors scaled otherwise are another model
        identity["scaling"] = spec.scaling
    return identity


def model_id_of(base_sha: str, architecture: str, spec: LoraSpec, classes: Sequence[str],
                template: str, preprocess: Dict, text_context: int, input_kind: str,
                frozen_seed: Optional[int] = None, quick_gelu: bool = False) -> str:
    """What makes two bundles' adapters interchangeable: same base, activations, LoRA layout, head and inputs."""
    identity = {
        "base_weights_sha256": base_sha,
        "architecture": architecture,
        "lora": lora_identity(spec, frozen_seed),
        "classes": list(classes),
        "prompt_template": template,
        "preprocess": preprocess,
        "text_context": text_context,
        "input_kind": input_kind,
    }
    if quick_gelu:  # the same weights with another activation are another model
        identity["quick_gelu"] = True
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


class _Stages:
    """Staged progress lines: `[3/7] exporting the image encoder ... 4.1 s`."""

    def __init__(self, total: int, say: Callable[[str], None]) -> None:
        self.total, self.say, self.n = total, say, 0
        self.seconds: Dict[str, float] = {}

    def run(self, label: str, fn: Callable, *args, **kwargs):
        self.n += 1
        self.say(f"[{self.n}/{self.total}] {label} ...")
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        dt = time.perf_counter() - t0
        self.seconds[label] = dt
        self.say(f"[{self.n}/{self.total}] {label}: done in {dt:.1f} s")
        return result


def export_bundle(opts: ExportOptions, say: Callable[[str], None] = print) -> ExportResult:
    """Write a bundle to `opts.out`; on any failure nothing is left at (or changed in) `opts.out`."""
    checked = check_export(opts)
    out = checked.out
    weights = resolve_weights(
        checked.preset,
        pretrained=opts.pretrained,
        random_init=opts.random_init,
        cache_dir=opts.cache_dir,
        offline=opts.offline,
        quick_gelu=opts.quick_gelu,
        seed=opts.seed,
    )
    created: List[Path] = []
    try:
        make_folders(out.parent, created)
        plan = _Plan(checked.preset, weights, checked.classes, checked.template, checked.spec, checked.backends,
                     opts)
        result = _write_atomically(out, lambda tmp: _export_into(tmp, plan, say))
    except BaseException as exc:
        remove_empty_folders(created)
        if isinstance(exc, OSError):
            raise ExportError(f"export failed, nothing was written to {out}: {exc}") from exc
        raise
    result.path = out
    say(f"bundle written to {out} (model_id {result.manifest.model_id[:16]})")
    return result


def make_folders(folder: Path, created: List[Path]) -> None:
    """mkdir -p `folder`, appending each folder this call made to `created` (outermost first)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
        created.append(path)


def remove_empty_folders(created: Sequence[Path]) -> None:
    """Remove the folders `make_folders` made, innermost first, stopping at one that is not empty."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return


def _write_atomically(out: Path, write: Callable[[Path], ExportResult]) -> ExportResult:
    """Run `write` into a temp folder beside `out`, then move it to `out`; on failure remove it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; a bundle is for other users too
        with torch.no_grad():
            result = write(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _replace_dir(new: Path, target: Path) -> None:
    """Move folder `new` to `target`; an existing bundle there is replaced, and restored if that fails."""
    if not target.exists():
        os.replace(new, target)
        return
    check_replaceable(target)  # again: the folder may have changed during the export
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        try:
            os.replace(old, target)
        except OSError as restore_exc:
            raise ExportError(f"could not put the old bundle back at {target}: {restore_exc}; "
                              f"it is at {old}") from restore_exc
        raise
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class _Plan:
    """What `export_bundle` checked, for the stages to build from."""

    preset: Preset
    weights: WeightsSource
    classes: List[str]
    template: str
    spec: LoraSpec
    backends: Tuple[str, ...]
    opts: ExportOptions

    @property
    def text_mode(self) -> bool:
        return self.spec.tower == "text"

    @property
    def frozen_a(self) -> bool:
        """FFA-LoRA: A drawn from --seed and frozen, only B trained (and the frozen A's shipped)."""
        return self.spec.variant == "ffa"

    @property
    def frozen_seed(self) -> Optional[int]:
        return self.opts.seed if self.frozen_a else None

    @property
    def stage_count(self) -> int:
        return 5 + int(self.text_mode) + int(self.opts.image_encoder_int8) + len(self.backends)


@dataclass
class _Trainable:
    """CLIP with LoRA attached, as a classifier over the class prompts, and how its graphs are named."""

    clip: torch.nn.Module
    loaded: LoadedWeights  # what loading the base weights found out (the manifest's `pretrained`)
    base_sha: str
    preprocess: Dict
    classifier: torch.nn.Module
    input_kind: str  # "features" (text tower mode) or "pixels"
    lora_params: Dict[str, torch.nn.Parameter]
    param_to_adapter: Dict[str, str]  # parameter name in the classifier -> adapter tensor name
    example: torch.Tensor

    @property
    def adapter_names(self) -> List[str]:
        return list(self.lora_params)

    @property
    def feature_dim(self) -> int:
        return int(self.example.shape[1]) if self.input_kind == "features" else 0


def _export_into(tmp: Path, plan: _Plan, say: Callable[[str], None]) -> ExportResult:
    """Every stage into folder `tmp`, with a progress line each; the bundle's files are required_files'."""
    stages = _Stages(plan.stage_count, say)
    clip, loaded, base_sha = stages.run(f"building {plan.preset.architecture} ({plan.weights.kind})", _build_base,
                                        plan)
    preprocess = preprocess_config(clip, plan.weights, plan.preset)
    onnx_facts = {"opset": onnx_export.OPSET, "ir_version": onnx_export.MAX_IR_VERSION,
                  "tested_onnxruntime": dict(onnx_export.TESTED_ONNXRUNTIME)}
    if plan.text_mode:
        stages.run("exporting the frozen image encoder", _write_image_encoder, clip, preprocess["image_size"], tmp)
    if plan.opts.image_encoder_int8:
        from .quantize import write_int8_encoder

        onnx_facts["image_encoder_int8"] = stages.run(
            "quantizing the image encoder to int8 (ONNX Runtime dynamic quantization)", write_int8_encoder,
            tmp / B.IMAGE_ENCODER, tmp / B.IMAGE_ENCODER_INT8)
    spec, ffa = plan.spec, plan.frozen_a
    lora_params = stages.run(f"adding {'FFA-' if ffa else ''}LoRA to the {spec.tower} tower(s) (rank {spec.rank}, "
                             f"{'+'.join(spec.ordered_targets)}{', A frozen' if ffa else ''})", lora.attach_lora,
                             clip, spec, plan.opts.seed)
    model = _trainable(plan, clip, loaded, base_sha, preprocess, lora_params)
    optimizer = B.OptimizerConfig(name=plan.opts.optimizer, betas=tuple(plan.opts.betas), eps=plan.opts.eps,
                                  weight_decay=plan.opts.weight_decay)
    if "ort-training" in plan.backends:
        stages.run("writing ONNX Runtime training artifacts (training, eval, optimizer, checkpoint)",
                   _write_ort_training, model, tmp, optimizer, plan.opts.loss)
    if "step" in plan.backends:
        step_info = stages.run("tracing the portable training step graph (train_step.onnx)",
                               _write_step_graph, model, tmp, optimizer, plan.opts.loss)
        onnx_facts["step_opset"] = step_info["opset"]
    stages.run("exporting the inference model (LoRA tensors as inputs)", _write_inference_model, model, tmp,
               ffa)
    if ffa:
        _write_frozen_factors(model, tmp, plan.opts.seed)
    onnx_facts["shared_data"] = stages.run(f"storing the graphs' frozen weights once ({shared_data.SHARED_DATA})",
                                           _share_weights, tmp)
    manifest = stages.run("writing adapter.safetensors and manifest.json", _write_manifest, tmp, plan, model,
                          optimizer, onnx_facts)
    return ExportResult(tmp, manifest, stages.seconds)


def _build_base(plan: _Plan) -> Tuple[torch.nn.Module, LoadedWeights, str]:
    """The open_clip model with its weights, what loading them found out, and the sha256 of its state (the
    base of the model_id)."""
    model, loaded = load_base(plan.preset, plan.weights)
    return model, loaded, state_sha256(model)


def _share_weights(tmp: Path) -> Dict:
    """The float graphs' frozen tensors, each once, in weights.data (export/shared_data.py)."""
    graphs_ = [g for g in (B.IMAGE_ENCODER, B.INFERENCE_MODEL, B.TRAIN_STEP_MODEL) if (tmp / g).is_file()]
    return {"file": shared_data.SHARED_DATA, "graphs": graphs_, **shared_data.share_weights(tmp, graphs_)}


def _write_image_encoder(clip: torch.nn.Module, image_size: int, tmp: Path) -> None:
    encoder = onnx_export.export_graph(
        graphs.ImageEncoder(clip), (torch.zeros(2, 3, image_size, image_size),), input_names=["pixels"],
        output_names=["features"], dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
    )
    onnx_export.save_model(encoder, tmp / B.IMAGE_ENCODER)


def _trainable(plan: _Plan, clip: torch.nn.Module, loaded: LoadedWeights, base_sha: str, preprocess: Dict,
               lora_params: Dict[str, torch.nn.Parameter]) -> _Trainable:
    tokens = graphs.tokenize_prompts(plan.classes, plan.template, plan.preset.architecture)
    classifier, input_kind = graphs.build_classifier(clip, tokens, plan.spec.tower)
    size = preprocess["image_size"]
    return _Trainable(clip, loaded, base_sha, preprocess, classifier, input_kind, lora_params,
                      lora.module_names(classifier, lora_params),
                      _example_input(input_kind, graphs.feature_dim(clip, size), size))


def _write_ort_training(model: _Trainable, tmp: Path, optimizer: B.OptimizerConfig, loss: str) -> None:
    name = model.input_kind
    forward = onnx_export.export_graph(
        model.classifier, (model.example,), input_names=[name], output_names=[ort_artifacts.LOGITS],
        dynamic_axes={name: {0: "batch"}, ort_artifacts.LOGITS: {0: "batch"}}, for_training=True,
    )
    onnx_export.rename_tensors(forward, model.param_to_adapter)
    ort_artifacts.generate(forward, model.adapter_names, tmp, optimizer, loss)


def _write_step_graph(model: _Trainable, tmp: Path, optimizer: B.OptimizerConfig, loss: str) -> Dict:
    from . import step_graph

    return step_graph.export_step_graph(model.classifier, model.param_to_adapter, model.adapter_names,
                                        model.example, model.input_kind, tmp / B.TRAIN_STEP_MODEL, optimizer, loss)


def _write_inference_model(model: _Trainable, tmp: Path, frozen_a: bool) -> None:
    name = model.input_kind
    wrapper = graphs.WithAdapterInputs(model.classifier, lora.factors_by_name(model.classifier, model.lora_params),
                                       frozen_a)
    proto = onnx_export.export_graph(
        wrapper, (model.example, *[p.detach().clone() for p in model.lora_params.values()]),
        input_names=[name, *model.adapter_names], output_names=["logits"],
        dynamic_axes={name: {0: "batch"}, "logits": {0: "batch"}},
        fold_constants=False,  # weights as the step graph holds them: stored once (shared_data)
    )
    onnx_export.save_model(proto, tmp / B.INFERENCE_MODEL)


def _write_frozen_factors(model: _Trainable, tmp: Path, seed: int) -> None:
    """FFA-LoRA's frozen A tensors (constants of the graphs too), for the devices and the aggregator."""
    frozen = {name: t.cpu().numpy().astype(np.float32)
              for name, t in lora.frozen_factors(model.classifier, model.lora_params).items()}
    atomic_write_bytes(tmp / B.FROZEN_FACTORS, safetensors_save(frozen, metadata={"variant": "ffa", "seed": str(seed)}))


def _write_manifest(tmp: Path, plan: _Plan, model: _Trainable, optimizer: B.OptimizerConfig,
                    onnx_facts: Dict) -> B.Manifest:
    """The initial adapter (round 0) and the manifest over every file, re-read and verified."""
    spec, text_context = plan.spec, model.classifier.text_context
    model_id = model_id_of(model.base_sha, plan.preset.architecture, spec, plan.classes, plan.template,
                           model.preprocess, text_context, model.input_kind, plan.frozen_seed, model.loaded.quick_gelu)
    tensors = {name: p.detach().cpu().numpy().astype(np.float32) for name, p in model.lora_params.items()}
    atomic_write_bytes(tmp / B.ADAPTER, adapter_blob.encode(tensors, model_id=model_id, round=0, kind="initial"))
    files = B.required_files(model.input_kind, plan.backends, spec.variant)
    if plan.opts.image_encoder_int8:
        files.append(B.IMAGE_ENCODER_INT8)
    external = external_data_of(tmp, files)
    pre = model.preprocess
    manifest = B.Manifest(
        model_id=model_id, preset=plan.preset.name, architecture=plan.preset.architecture,
        pretrained=model.loaded.describe(), base_weights_sha256=model.base_sha,
        lora=B.LoraConfig(spec.tower, spec.rank, spec.alpha, spec.ordered_targets, spec.variant, plan.frozen_seed,
                          spec.scaling, spec.init),
        trainable=tuple(B.TensorSpec(n, tuple(t.shape), "float32") for n, t in tensors.items()),
        classes=tuple(plan.classes), prompt_template=plan.template, text_context=text_context,
        preprocess=B.Preprocess(pre["image_size"], tuple(pre["mean"]), tuple(pre["std"]), pre["interpolation"],
                                pre["resize_mode"]),
        input_kind=model.input_kind, feature_dim=model.feature_dim, logit_scale=float(model.clip.logit_scale.exp()),
        backends=plan.backends, optimizer=optimizer,
        files={name: sha256_file(tmp / name) for name in sorted({*files, *_data_files(external)})},
        external_data=external, onnx=onnx_facts, created=_provenance(plan.opts), loss=plan.opts.loss,
        recipe=plan.opts.recipe,
    )
    atomic_write_bytes(tmp / B.MANIFEST, manifest.to_json().encode())
    B.load_bundle(tmp)  # re-read and verify what was written
    return manifest


def _data_files(external: Dict[str, Tuple[str, ...]]) -> List[str]:
    return [data for names in external.values() for data in names]


def external_data_of(folder: Path, files: Sequence[str]) -> Dict[str, Tuple[str, ...]]:
    """{ONNX file: the external data files it reads} for those of `files` that have any."""
    found = {name: tuple(onnx_export.external_data_files(folder / name)) for name in files if name.endswith(".onnx")}
    return {name: data for name, data in sorted(found.items()) if data}


def _example_input(input_kind: str, feature_dim: int, image_size: int) -> torch.Tensor:
    if input_kind == "features":
        return torch.randn(2, feature_dim)
    return torch.randn(2, 3, image_size, image_size)


def _provenance(opts: ExportOptions) -> Dict:
    import open_clip

    versions = {"flora_edge": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
                "onnx": onnx.__version__}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover
        pass
    return {"by": "flora-export", "versions": versions, "lora_init_seed": opts.seed,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


__all__ = ["DEFAULT_PROMPT", "ExportError", "ExportOptions", "ExportResult", "check_classes", "check_output",
           "check_replaceable", "check_template", "export_bundle", "read_classes"]
