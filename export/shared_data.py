"""One external-data file for the frozen weights of several ONNX graphs, each distinct tensor stored once.

The inference model and the portable step graph both hold the frozen CLIP weights they read
(the step graph's whole text tower in `text` mode, both towers in the pixel modes). ONNX's
external data format lets a tensor live at (location, offset, length) in a file beside the graph,
and nothing stops two graphs from naming the same range: the tensors are content-addressed here
(sha256 of their bytes), so a weight that two graphs hold is written once and both point at it.
Offsets are aligned to 4096 bytes, so onnxruntime may map tensors from the file instead of copying.

ONNX Runtime's training checkpoint is a flatbuffer of its own (not ONNX external data) holding the
parameters its training and eval sessions share; its frozen weights stay in it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import onnx
from onnx import numpy_helper

from .onnx_export import cap_ir_version

SHARED_DATA = "weights.data"
#: tensors smaller than this stay inside their graph (shapes, small constants)
MIN_BYTES = 1024
ALIGN = 4096


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _initializers(attr.g)
            for sub in attr.graphs:
                yield from _initializers(sub)


def _raw(tensor: onnx.TensorProto) -> bytes:
    """The tensor's bytes as raw_data holds them (little-endian), whatever field holds them now."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


class SharedData:
    """An append-only, content-addressed external-data file: `add(bytes)` -> (offset, length)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open(path, "wb")  # noqa: SIM115 - closed by close(), the writer spans many calls
        self._at: Dict[str, Tuple[int, int]] = {}
        self.stored = 0  # bytes of distinct tensors written
        self.referenced = 0  # bytes of every tensor that points here

    def add(self, data: bytes) -> Tuple[int, int]:
        self.referenced += len(data)
        key = hashlib.sha256(data).hexdigest()
        if key not in self._at:
            offset = self._fh.seek(0, os.SEEK_END)
            pad = -offset % ALIGN
            if pad:
                self._fh.write(b"\0" * pad)
                offset += pad
            self._fh.write(data)
            self._at[key] = (offset, len(data))
            self.stored += len(data)
        return self._at[key]

    def close(self) -> None:
        self._fh.close()


def share_weights(folder: Path, graphs: Sequence[str], data_name: str = SHARED_DATA) -> Dict[str, int]:
    """Move the large tensors of `graphs` (files in `folder`) into one data file; each graph is rewritten to
    point at it, and the per-graph data files they had before are removed. Returns byte counts."""
    before = _external_files(folder, graphs)
    store = SharedData(folder / f".{data_name}.partial")
    try:
        rewritten: List[Tuple[str, onnx.ModelProto]] = []
        for name in graphs:
            model = onnx.load(str(folder / name), load_external_data=True)
            for tensor in _initializers(model.graph):
                data = _raw(tensor)
                if len(data) < MIN_BYTES:
                    continue
                offset, length = store.add(data)
                _point_at(tensor, data_name, offset, length)
            rewritten.append((name, model))
    finally:
        store.close()
    os.replace(store.path, folder / data_name)
    for name, model in rewritten:
        onnx.save_model(cap_ir_version(model), str(folder / name))
    for stale in before - {data_name}:
        (folder / stale).unlink(missing_ok=True)
    return {"stored_bytes": store.stored, "referenced_bytes": store.referenced}


def _point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    for field in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data", "raw_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def _external_files(folder: Path, graphs: Sequence[str]) -> set:
    from .onnx_export import external_data_files

    return {data for name in graphs for data in external_data_files(folder / name)}


def used_ranges(folder: Path, graphs: Sequence[str], data_name: str = SHARED_DATA) -> List[Tuple[int, int]]:
    """The (offset, length) ranges of `data_name` that `graphs` read, sorted and distinct."""
    ranges = set()
    for name in graphs:
        model = onnx.load(str(folder / name), load_external_data=False)
        for tensor in _initializers(model.graph):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            if info.get("location") == data_name:
                ranges.add((int(info.get("offset", 0)), int(info["length"])))
    return sorted(ranges)
