"""The adapter blob: LoRA tensors plus string metadata, as one safetensors file.

This is what crosses the network (the global adapter and every client update) and what the
bundle's `adapter.safetensors` holds. A receiver validates the header (names, shapes, dtype,
metadata) before it decodes a single tensor, and the finite-ness of the values after.
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Tuple, Union

import numpy as np
from safetensors.numpy import save as _st_save

from . import wire
from .bundle import TensorSpec
from .fileio import PathLike, atomic_write_bytes

FORMAT = "flora-adapter"
FORMAT_VERSION = "1"
KINDS = ("initial", "global", "update", "partial")
#: A `partial` is a site's fold of its devices' updates: the weighted sum sum_i n_i * u_i (float64, so that
#: the root's fold of partials is the flat FedAvg of every update) with num_samples = sum_i n_i.
PARTIAL = "partial"
PARTIAL_DTYPE = "float64"

_DTYPES = {"float32": ("F32", np.float32), "float16": ("F16", np.float16), "float64": ("F64", np.float64)}
_ST_TO_NAME = {st: name for name, (st, _) in _DTYPES.items()}
_MAX_HEADER = 4 << 20
MAX_TENSORS = 20_000
_DECIMAL = re.compile(r"0|[1-9][0-9]*")  # at most 512 characters: the header schema bounds every value

Buffer = Union[bytes, bytearray, memoryview]

#: The safetensors header as edge.wire checks it before anything reads a field: tensor entries of exactly
#: {dtype, shape, data_offsets} (shapes of at most 8 dims), and `__metadata__` of string to string of at most
#: 512 characters (room for a 301-digit num_samples, the largest cap; a 5,000-digit one is malformed before
#: anything parses it).
_ENTRY = wire.Object({
    "dtype": wire.Str(16),
    "shape": wire.Array(wire.Int(0, 2 ** 40), max_len=8),
    "data_offsets": wire.Array(wire.Int(0, 2 ** 62), min_len=2, max_len=2),
})
_HEADER = wire.Object(
    {"__metadata__": wire.optional(wire.Nullable(wire.Map(wire.Str(64), wire.Str(512), max_len=64)))},
    others=wire.Map(wire.Str(512), _ENTRY, max_len=MAX_TENSORS),
)


class AdapterError(wire.WireError):
    """An adapter blob is malformed or does not fit the bundle it is meant for (reason `malformed`)."""


@dataclass(frozen=True)
class AdapterMeta:
    model_id: str
    round: int
    kind: str
    dtype: str
    client_id: Optional[str] = None
    num_samples: Optional[int] = None
    num_updates: Optional[int] = None  # partials only: how many device updates the sum holds

    def to_strings(self) -> Dict[str, str]:
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "round": str(self.round),
            "kind": self.kind,
            "dtype": self.dtype,
        }
        if self.client_id is not None:
            meta["client_id"] = self.client_id
        if self.num_samples is not None:
            meta["num_samples"] = str(self.num_samples)
        if self.num_updates is not None:
            meta["num_updates"] = str(self.num_updates)
        return meta

    @classmethod
    def from_strings(cls, meta: Mapping[str, str]) -> AdapterMeta:
        if meta.get("format") != FORMAT:
            raise AdapterError(f"not a FLORA adapter: metadata format is {meta.get('format')!r}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise AdapterError(f"unsupported adapter format_version {meta.get('format_version')!r}")
        for key in ("model_id", "round", "kind", "dtype"):
            if key not in meta:
                raise AdapterError(f"adapter metadata lacks {key!r}")
        kind = meta["kind"]
        if kind not in KINDS:
            raise AdapterError(f"adapter kind {kind!r} is not one of {KINDS}")
        if meta["dtype"] not in _DTYPES:
            raise AdapterError(f"adapter dtype {meta['dtype']!r} is not one of {sorted(_DTYPES)}")
        rnd = _parse_int(meta["round"], "round")
        if rnd < 0:
            raise AdapterError(f"adapter round {rnd} is negative")
        num_samples = _parse_int(meta["num_samples"], "num_samples") if "num_samples" in meta else None
        num_updates = _parse_int(meta["num_updates"], "num_updates") if "num_updates" in meta else None
        if kind in ("update", PARTIAL):
            if not meta.get("client_id"):
                raise AdapterError(f"an {kind} must name its client_id")
            if num_samples is None or num_samples <= 0:
                raise AdapterError(f"an {kind} needs a positive num_samples, got {meta.get('num_samples')!r}")
        if (meta["dtype"] == PARTIAL_DTYPE) != (kind == PARTIAL):
            raise AdapterError(f"only a partial is {PARTIAL_DTYPE} (and it always is); this {kind} is {meta['dtype']}")
        if kind == PARTIAL and (num_updates is None or num_updates <= 0):
            raise AdapterError(f"a partial needs a positive num_updates, got {meta.get('num_updates')!r}")
        return cls(
            model_id=meta["model_id"],
            round=rnd,
            kind=kind,
            dtype=meta["dtype"],
            client_id=meta.get("client_id"),
            num_samples=num_samples,
            num_updates=num_updates,
        )


def _parse_int(text: str, what: str) -> int:
    """A canonical decimal (`str(int)`: no sign, space, '_' or leading zero)."""
    if not _DECIMAL.fullmatch(text):
        raise AdapterError(f"adapter metadata {what}={wire.short(text)} is not a plain decimal integer")
    return int(text)


@dataclass(frozen=True)
class Adapter:
    meta: AdapterMeta
    tensors: Mapping[str, np.ndarray]  # a dict, or FlatTensors for a blob in `encode`'s own layout

    def as_float32(self) -> Dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.float32) for k, v in self.tensors.items()}


def encode(
    tensors: Mapping[str, np.ndarray],
    *,
    model_id: str,
    round: int,
    kind: str,
    dtype: str = "float32",
    client_id: Optional[str] = None,
    num_samples: Optional[int] = None,
    num_updates: Optional[int] = None,
) -> bytes:
    """Serialise LoRA tensors (cast to `dtype`) with their metadata into one safetensors blob."""
    if dtype not in _DTYPES:
        raise AdapterError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    np_dtype = _DTYPES[dtype][1]
    meta = AdapterMeta(model_id, int(round), kind, dtype, client_id, num_samples, num_updates)
    meta_strings = meta.to_strings()
    AdapterMeta.from_strings(meta_strings)  # refuse to write what a receiver would refuse
    arrays = {}
    for name, value in tensors.items():
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.floating):
            raise AdapterError(f"tensor {name!r} has non-float dtype {arr.dtype}")
        arrays[name] = np.ascontiguousarray(arr, dtype=np_dtype)
    return _st_save(arrays, metadata=meta_strings)


def read_header(blob: Buffer) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, str]]:
    """Parse the safetensors header only: ({name: {dtype, shape, data_offsets}}, metadata)."""
    view = memoryview(blob)
    if len(view) < 8:
        raise AdapterError(f"adapter blob of {len(view)} bytes is too short to hold a header")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > _MAX_HEADER or header_len > len(view) - 8:
        raise AdapterError(f"adapter header length {header_len} is implausible for a {len(view)}-byte blob")
    try:
        header = _HEADER.check(wire.loads(view[8 : 8 + header_len], _MAX_HEADER, what="adapter header"), "header")
    except wire.WireError as exc:
        raise AdapterError(exc.detail) from None
    meta = header.pop("__metadata__") or {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if begin > end:
            raise AdapterError(f"adapter header entry {wire.short(name)} has data_offsets {begin} > {end}")
    return header, meta


def check_header(
    entries: Mapping[str, Mapping[str, Any]],
    meta: AdapterMeta,
    specs: Iterable[TensorSpec],
) -> None:
    """Check names, shapes and dtype of a parsed header against the manifest's tensor list."""
    expected = {s.name: s for s in specs}
    missing = sorted(set(expected) - set(entries))
    extra = sorted(set(entries) - set(expected))
    if missing or extra:
        raise AdapterError(
            f"adapter tensor names do not match the bundle: missing {missing[:3]}{'…' if len(missing) > 3 else ''}"
            f" ({len(missing)}), unexpected {extra[:3]}{'…' if len(extra) > 3 else ''} ({len(extra)})"
        )
    want_st = _DTYPES[meta.dtype][0]
    for name, spec in expected.items():
        entry = entries[name]
        shape = tuple(int(x) for x in entry["shape"])
        if shape != tuple(spec.shape):
            raise AdapterError(f"adapter tensor {name!r} has shape {list(shape)}, the bundle says {list(spec.shape)}")
        if entry["dtype"] != want_st:
            name_dtype = _ST_TO_NAME.get(entry["dtype"], entry["dtype"])
            raise AdapterError(
                f"adapter tensor {name!r} is {name_dtype}, the header metadata says {meta.dtype}"
            )


def tensor_views(blob: Buffer, entries: Mapping[str, Mapping[str, Any]], dtype: str) -> Dict[str, np.ndarray]:
    """Numpy views of the tensors at their header offsets, without copying (read-only for `bytes`).

    `entries` come from `read_header(blob)`. Every tensor must be `dtype`, its byte range must match
    its shape, and the ranges must tile the data section exactly (no gap, overlap or trailing bytes),
    as the safetensors format requires.
    """
    if dtype not in _DTYPES:
        raise AdapterError(f"adapter dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    st_dtype, np_dtype = _DTYPES[dtype]
    view = memoryview(blob).cast("B")
    (header_len,) = struct.unpack("<Q", view[:8])
    start = 8 + header_len
    le_dtype = np.dtype(np_dtype).newbyteorder("<")
    spans = []
    for name, entry in entries.items():
        if entry["dtype"] != st_dtype:
            have = _ST_TO_NAME.get(entry["dtype"], entry["dtype"])
            raise AdapterError(f"adapter tensor {name!r} is {have}, the header metadata says {dtype}")
        shape = tuple(int(x) for x in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * le_dtype.itemsize:
            raise AdapterError(
                f"adapter tensor {name!r} of shape {list(shape)} needs {numel * le_dtype.itemsize} bytes, "
                f"its data_offsets span {end - begin}"
            )
        spans.append((begin, end, name, shape, numel))
    spans.sort(key=lambda s: (s[0], s[1]))
    position = 0
    for begin, end, name, _, _ in spans:
        if begin != position:
            raise AdapterError(f"adapter tensor {name!r} starts at byte {begin} of the data, expected {position} "
                               "(offsets overlap or leave a gap)")
        position = end
    if position != len(view) - start:
        raise AdapterError(f"adapter data section is {len(view) - start} bytes, its tensors cover {position}")
    return {
        name: np.frombuffer(view, dtype=le_dtype, count=numel, offset=start + begin).reshape(shape)
        if numel else np.zeros(shape, le_dtype)
        for begin, _, name, shape, numel in spans
    }


@dataclass(frozen=True, eq=False)  # one object per spec list (layout_of caches): compared by identity
class Layout:
    """Where `encode` puts a spec list's tensors: one flat run of elements, tensor after tensor.

    Every blob `encode` writes for these specs has exactly this header (per dtype), so a receiver that
    finds it knows names, shapes, dtype and byte ranges at once and can treat the payload as one array.
    """

    entries: Tuple[Tuple[str, Tuple[int, ...], int, int], ...]  # (name, shape, first element, end element)
    numel: int
    headers: Mapping[str, Mapping[str, Mapping[str, Any]]]  # dtype -> the header entries of such a blob

    @functools.cached_property
    def index(self) -> Dict[str, Tuple[Tuple[int, ...], int, int]]:
        """name -> (shape, first element, end element)."""
        return {name: (shape, a, b) for name, shape, a, b in self.entries}

    def split(self, flat: np.ndarray) -> Dict[str, np.ndarray]:
        """Views of a flat array in this layout, by tensor name."""
        return {name: flat[a:b].reshape(shape) for name, shape, a, b in self.entries}


@functools.lru_cache(maxsize=8)
def layout_of(specs: Tuple[TensorSpec, ...]) -> Layout:
    """The layout `encode` gives these specs (read off a blob of zeros, so it is safetensors' own order)."""
    headers = {}
    for dtype, (_, np_dtype) in _DTYPES.items():
        zeros = {s.name: np.zeros(s.shape, np_dtype) for s in specs}
        headers[dtype], _ = read_header(_st_save(zeros, metadata={"dtype": dtype}))
    itemsize = np.dtype(np.float32).itemsize
    entries = tuple(sorted(
        ((name, tuple(e["shape"]), e["data_offsets"][0] // itemsize, e["data_offsets"][1] // itemsize)
         for name, e in headers["float32"].items()), key=lambda entry: entry[2]))
    return Layout(entries, sum(s.numel for s in specs), headers)


class FlatTensors(Mapping[str, np.ndarray]):
    """An adapter's tensors as one flat payload array in a known layout; by name, they are views of it."""

    def __init__(self, flat: np.ndarray, layout: Layout) -> None:
        self.flat = flat
        self.layout = layout

    def __getitem__(self, name: str) -> np.ndarray:  # a view made on demand: the fold uses `flat` alone
        shape, begin, end = self.layout.index[name]
        return self.flat[begin:end].reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.index)

    def __len__(self) -> int:
        return len(self.layout.index)


def canonical_tensors(blob: Buffer, entries: Mapping[str, Any], dtype: str,
                      specs: Tuple[TensorSpec, ...]) -> Optional[FlatTensors]:
    """Zero-copy tensors of a blob whose header is exactly what `encode` writes for `specs`, else None.

    Such a header has the manifest's names and shapes, one dtype and byte ranges that tile the data
    in order, so the per-tensor checks of `check_header` and `tensor_views` hold by construction; only
    the length of the data section is left to check. Any other header takes the general path.
    """
    if dtype not in _DTYPES:
        return None
    layout = layout_of(tuple(specs))
    if entries != layout.headers[dtype]:
        return None
    view = memoryview(blob).cast("B")
    (header_len,) = struct.unpack("<Q", view[:8])
    covered = layout.numel * np.dtype(_DTYPES[dtype][1]).itemsize
    if len(view) - 8 - header_len != covered:
        raise AdapterError(f"adapter data section is {len(view) - 8 - header_len} bytes, its tensors cover {covered}")
    return FlatTensors(payload_view(blob, dtype), layout)


def payload_view(blob: Buffer, dtype: str) -> np.ndarray:
    """The whole data section as one flat array (all tensors, in file order): one pass checks them all.

    Only meaningful after `tensor_views` accepted the blob for the same `dtype`.
    """
    view = memoryview(blob).cast("B")
    (header_len,) = struct.unpack("<Q", view[:8])
    return np.frombuffer(view, dtype=np.dtype(_DTYPES[dtype][1]).newbyteorder("<"), offset=8 + header_len)


def _all_finite(arr: np.ndarray) -> bool:
    if arr.dtype.kind == "f" and arr.dtype.itemsize == 2:  # float16: exponent bits all ones is inf or NaN;
        return bool(((arr.view(np.uint16) & 0x7C00) != 0x7C00).all())  # ~15x faster than np.isfinite
    return bool(np.isfinite(arr).all())


def find_non_finite(tensors: Mapping[str, np.ndarray], payload: Optional[np.ndarray] = None) -> Optional[str]:
    """The name of the first tensor holding NaN or an infinity, or None if all values are finite.

    With `payload` (from `payload_view`) the common all-finite case is one vectorised pass.
    """
    if payload is not None and _all_finite(payload):
        return None
    for name, arr in tensors.items():
        if not _all_finite(np.asarray(arr)):
            return name
    return None


def decode(
    blob: Buffer,
    specs: Optional[Iterable[TensorSpec]] = None,
    *,
    model_id: Optional[str] = None,
    max_bytes: Optional[int] = None,
    check_finite: bool = True,
    copy: bool = True,
) -> Adapter:
    """Validate and decode an adapter blob.

    The size, header, metadata, model_id and (with `specs`) tensor names, shapes and dtype are
    checked before any tensor is decoded; the byte ranges of the tensors, then finite values, after.
    With `copy=False` the tensors are zero-copy views into `blob` (read-only if it is `bytes`).
    """
    if max_bytes is not None and len(blob) > max_bytes:
        raise AdapterError(f"adapter blob is {len(blob)} bytes, over the limit of {max_bytes}")
    entries, meta_strings = read_header(blob)
    meta = AdapterMeta.from_strings(meta_strings)
    if model_id is not None and meta.model_id != model_id:
        raise AdapterError(f"adapter is for model_id {meta.model_id[:16]}…, this bundle is {model_id[:16]}…")
    tensors: Mapping[str, np.ndarray]
    fast = canonical_tensors(blob, entries, meta.dtype, tuple(specs)) if specs is not None else None
    if fast is not None:
        tensors = fast
    else:
        if specs is not None:
            check_header(entries, meta, specs)
        tensors = tensor_views(blob, entries, meta.dtype)
    if check_finite:
        bad = find_non_finite(tensors, payload_view(blob, meta.dtype))
        if bad is not None:
            raise AdapterError(f"adapter tensor {bad!r} holds NaN or infinite values")
    if copy:
        if isinstance(tensors, FlatTensors):
            return Adapter(meta, FlatTensors(tensors.flat.copy(), tensors.layout))
        return Adapter(meta, {name: arr.copy() for name, arr in tensors.items()})
    return Adapter(meta, tensors)


def max_blob_bytes(specs: Iterable[TensorSpec], header_slack: int = 64 * 1024, itemsize: int = 4) -> int:
    """The largest plausible blob for these tensors: fp32 payload (`itemsize` 8: a float64 partial) plus room
    for the header."""
    return sum(s.numel for s in specs) * itemsize + header_slack


def save(path: PathLike, blob: bytes) -> None:
    atomic_write_bytes(path, blob)


def load_file(path: PathLike, specs: Optional[Iterable[TensorSpec]] = None, **kwargs: Any) -> Adapter:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AdapterError(f"cannot read adapter {path}: {exc}") from exc
    return decode(data, specs, **kwargs)
