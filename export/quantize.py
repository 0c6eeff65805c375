"""The int8 image encoder (`flora-export --image-encoder-int8`): ONNX Runtime dynamic quantization.

Weights of the MatMul and Gemm nodes become int8 (per tensor, symmetric), activations are quantized
on the fly per batch. Convolutions stay float: onnxruntime's CPU provider has no ConvInteger kernel,
and the patch embedding is a small part of a ViT's work. The fp32 encoder stays in the bundle; a
device picks the int8 one when asked (`flora-agent --image-encoder-int8`).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Dict, Iterator

import onnx

from .onnx_export import save_model

QUANTIZED_OPS = ("MatMul", "Gemm")


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization warns on the root logger that a pre-processing pass could help; it is a
    shape-inference and fusion pass that changes neither the quantized weights nor the kernels used."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(previous, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(previous)


def write_int8_encoder(src: Path, dst: Path) -> Dict[str, Any]:
    """Quantize the fp32 image encoder at `src` into `dst`; returns what the manifest records about it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_logger():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS))
    model = onnx.load(str(dst))
    save_model(model, dst)  # the IR version stamp of every bundle graph
    int8_matmuls = sum(n.op_type == "MatMulInteger" for n in model.graph.node)
    return {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "int8",
            "op_types": list(QUANTIZED_OPS), "int8_matmuls": int8_matmuls}
