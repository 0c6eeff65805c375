"""torch -> ONNX for the bundle's graphs, with the fixes ONNX Runtime's training tools need."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import onnx
import torch
import torch.nn.functional as F
from torch import nn

#: ONNX opset of every bundle graph except train_step.onnx: LayerNormalization is a single op
#: from 17 on.
OPSET = 17
#: IR version stamped on every bundle graph. Newer `onnx` packages stamp IR 10+, which older
#: runtimes refuse (onnxruntime-training 1.19, its last release, reads up to 10); our graphs use
#: nothing newer than IR 8 (opset 17/18).
MAX_IR_VERSION = 8
#: The onnxruntime builds the project's tests run the bundle graphs on (Python 3.11): onnxruntime-training
#: 1.19.2, its last release, for every graph (tests/test_export.py, tests/test_step_backend.py), and for
#: the `step` backend without torch the plain onnxruntime that `pip install onnxruntime` gave, 1.32.0
#: (also under aarch64 emulation, tests/test_arm64.py), and the oldest the `edge` extra admits, 1.16.3.
TESTED_ONNXRUNTIME = {"onnxruntime-training": "1.19.2", "onnxruntime": "1.32.0", "onnxruntime-oldest": "1.16.3"}
#: protobuf's limit; larger models keep their weights in an external data file.
_PROTO_LIMIT = 2_000_000_000


def export_graph(
    module: nn.Module,
    args: Tuple[torch.Tensor, ...],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Optional[Dict[str, Dict[int, str]]] = None,
    for_training: bool = False,
    fold_constants: Optional[bool] = None,
) -> onnx.ModelProto:
    """Trace `module` with the TorchScript exporter at opset 17 and return the ModelProto.

    For training graphs constant folding is off: folding would bake the LoRA parameters (which
    are initializers, like the frozen weights) into constants and leave nothing to train.
    `fold_constants=False` keeps the weights as the module holds them (not pre-transposed), so that
    they are byte for byte those of the step graph and can be stored once; onnxruntime folds the
    transposes itself when it loads the graph.
    """
    fold = (not for_training) if fold_constants is None else fold_constants
    buffer = _BytesSink()
    was_training = module.training
    if for_training:
        # The exporter merges initializers with equal values (every LoRA B starts at zero) unless
        # the top-level module says it is training, in which case it spares those that require
        # grad. Only the top-level flag is set: every submodule stays in eval mode.
        module.training = True
    try:
        with warnings.catch_warnings(), mha_fastpath_disabled(), packed_projection_as_split():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                buffer,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=fold,
                training=torch.onnx.TrainingMode.PRESERVE if for_training else torch.onnx.TrainingMode.EVAL,
                dynamo=False,
            )
    finally:
        module.training = was_training
    model = onnx.load_from_string(buffer.getvalue())
    if for_training:
        add_layernorm_stat_outputs(model)
    return model


@contextlib.contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    """Keep nn.MultiheadAttention on its decomposed path: its fused inference kernel
    (aten::_native_multi_head_attention) has no ONNX translation."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


@contextlib.contextmanager
def packed_projection_as_split() -> Iterator[None]:
    """Project self-attention's q, k and v with three slices of the packed weight, not by indexing.

    torch projects once with the packed (3E, E) weight, stacks the result to (3, ..., E) and takes
    [0], [1] and [2]: three Gathers, whose training gradient (onnxruntime's GatherGrad, a scatter-add)
    took 39 % of a ViT-B/32 vision-tower step. Three linears with the weight's row blocks give the same
    q, k, v (rows are packed in q, k, v order); their gradients meet at the weight (small) instead of at
    a (3, tokens, E) activation: measured on the vision tower at batch 32, 3.8 s a step and 1792 MiB
    instead of 9.2 s and 1725 MiB (Gather) or 5.1 s and 2043 MiB (chunking the projection).
    `multi_head_attention_forward` looks `_in_projection_packed` up at call time, so swapping it for
    the trace is enough.
    """
    original = F._in_projection_packed

    def as_split(q, k, v, w, b=None):
        if q is k and k is v:
            biases = b.chunk(3) if b is not None else (None, None, None)
            return [F.linear(q, w_part, b_part) for w_part, b_part in zip(w.chunk(3), biases)]
        return original(q, k, v, w, b)

    F._in_projection_packed = as_split
    try:
        yield
    finally:
        F._in_projection_packed = original


class _BytesSink:
    """A file-like sink for torch.onnx.export (avoids a temp file for the proto)."""

    def __init__(self) -> None:
        self._chunks: list = []

    def write(self, data: bytes) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def getvalue(self) -> bytes:
        return b"".join(self._chunks)


def add_layernorm_stat_outputs(model: onnx.ModelProto) -> int:
    """Give every LayerNormalization its optional Mean and InvStdDev outputs.

    torch exports LayerNormalization with the Y output only; onnxruntime-training's gradient
    builder for it reads the saved statistics (outputs 1 and 2) and fails without them.
    """
    changed = 0
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([f"{node.output[0]}_mean", f"{node.output[0]}_inv_std"])
            changed += 1
    return changed


def rename_tensors(model: onnx.ModelProto, mapping: Dict[str, str]) -> None:
    """Rename initializers/inputs (and every use of them) in place."""
    graph = model.graph
    for init in graph.initializer:
        if init.name in mapping:
            init.name = mapping[init.name]
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.name in mapping:
            value.name = mapping[value.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for i, name in enumerate(node.output):
            if name in mapping:
                node.output[i] = mapping[name]


def initializer_names(model: onnx.ModelProto) -> list:
    return [init.name for init in model.graph.initializer]


def cap_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lower the IR version stamp to MAX_IR_VERSION (see there)."""
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    return model


def external_data_files(path: Path) -> List[str]:
    """The external data files (names beside `path`) that the saved ONNX model at `path` reads."""
    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if not location or Path(location).name != location or location in (".", ".."):
                raise RuntimeError(f"{path.name} keeps tensor {tensor.name} in {location!r}, outside its folder")
            locations.add(location)
    return sorted(locations)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save, keeping weights in `<name>.data` beside it when the proto would pass protobuf's 2 GB limit."""
    cap_ir_version(model)
    if model.ByteSize() > _PROTO_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
    else:
        onnx.save_model(model, str(path))
