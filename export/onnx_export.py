"""torch -> ONNX for the bundle's graphs, with the fixes ONNX Runtime's training tools need."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import onnx
import torch
from torch import nn

#: ONNX opset of every bundle graph: LayerNormalization is a single op from 17 on, and
#: onnxruntime-training 1.17-1.19 and every onnxruntime >= 1.14 run it.
OPSET = 17
#: IR version stamped on every bundle graph. Newer `onnx` packages stamp IR 10+, which older
#: runtimes refuse (onnxruntime 1.19, onnxruntime-training's last release, reads up to 10; the
#: 1.15-1.16 builds on JetPack 5 up to 9); our graphs use nothing newer than IR 8 (opset 17/18).
MAX_IR_VERSION = 8
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
) -> onnx.ModelProto:
    """Trace `module` with the TorchScript exporter at opset 17 and return the ModelProto.

    For training graphs constant folding is off: folding would bake the LoRA parameters (which
    are initializers, like the frozen weights) into constants and leave nothing to train.
    """
    buffer = _BytesSink()
    was_training = module.training
    if for_training:
        # The exporter merges initializers with equal values (every LoRA B starts at zero) unless
        # the top-level module says it is training, in which case it spares those that require
        # grad. Only the top-level flag is set: every submodule stays in eval mode.
        module.training = True
    try:
        with warnings.catch_warnings(), mha_fastpath_disabled():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                buffer,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=not for_training,
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


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save, keeping weights in `<name>.data` beside it when the proto would pass protobuf's 2 GB limit."""
    cap_ir_version(model)
    if model.ByteSize() > _PROTO_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
    else:
        onnx.save_model(model, str(path))
