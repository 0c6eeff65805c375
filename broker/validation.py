"""Checks on a client update before it may touch the round's average: each failure has a reason code.

The cheap checks (size, header, metadata, round, sender) run first; the tensors are then viewed in
place (no copy) and checked for NaN and infinities in one pass over the payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Mapping, Optional

from edge import adapter
from edge.bundle import Manifest

#: Every reason an update can be rejected for (the history rows count them by these codes).
REASONS = (
    "oversized",        # the blob is larger than the manifest's tensors can need
    "malformed",        # not a readable FLORA adapter blob, not an update, or inconsistent byte offsets
    "bad-dtype",        # not float32/float16, or tensors of another dtype than the metadata says
    "bad-num-samples",  # num_samples missing, not an integer, or not positive
    "client-mismatch",  # the metadata names another client than the topic it came on
    "foreign-model",    # model_id of another bundle
    "late",             # for an earlier round
    "early",            # for a round that has not started
    "not-asked",        # the client was not asked this round
    "duplicate",        # the client already has an accepted update this round
    "bad-tensors",      # tensor names or shapes differ from the manifest
    "non-finite",       # NaN or infinity in a tensor
)

FLOAT_DTYPES = ("float32", "float16")
_SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16"}


class Rejected(Exception):
    """An update that must not touch the round, with its reason code and a readable detail."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RoundView:
    """What validation needs to know about the open round."""

    number: int
    asked: Optional[AbstractSet[str]]  # None: any client may report
    reported: AbstractSet[str]


def _num_samples_ok(meta: Mapping[str, str]) -> bool:
    try:
        return int(meta["num_samples"]) > 0
    except (KeyError, ValueError):
        return False


def validate_update(blob: bytes, topic_client: str, manifest: Manifest, round_: RoundView,
                    max_bytes: int) -> adapter.Adapter:
    """The update with zero-copy read-only tensors, or `Rejected` with the first reason that applies."""
    if len(blob) > max_bytes:
        raise Rejected("oversized", f"{len(blob)} bytes, limit {max_bytes}")
    try:
        entries, meta_strings = adapter.read_header(blob)
    except adapter.AdapterError as exc:
        raise Rejected("malformed", str(exc)) from None
    if meta_strings.get("kind") != "update":
        raise Rejected("malformed", f"kind is {meta_strings.get('kind')!r}, not 'update'")
    if meta_strings.get("dtype") not in FLOAT_DTYPES:
        raise Rejected("bad-dtype", f"dtype {meta_strings.get('dtype')!r} is not one of {FLOAT_DTYPES}")
    if not _num_samples_ok(meta_strings):
        raise Rejected("bad-num-samples", f"num_samples={meta_strings.get('num_samples')!r}, need a positive integer")
    try:
        meta = adapter.AdapterMeta.from_strings(meta_strings)
    except adapter.AdapterError as exc:
        raise Rejected("malformed", str(exc)) from None
    if meta.client_id != topic_client:
        raise Rejected("client-mismatch", f"metadata says {meta.client_id!r}, topic says {topic_client!r}")
    if meta.model_id != manifest.model_id:
        raise Rejected("foreign-model", f"model_id {meta.model_id[:16]}…, expected {manifest.model_id[:16]}…")
    if meta.round < round_.number:
        raise Rejected("late", f"for round {meta.round}, current round is {round_.number}")
    if meta.round > round_.number:
        raise Rejected("early", f"for round {meta.round}, current round is {round_.number}")
    if round_.asked is not None and topic_client not in round_.asked:
        raise Rejected("not-asked", f"{topic_client} was not asked in round {round_.number}")
    if topic_client in round_.reported:
        raise Rejected("duplicate", f"{topic_client} already has an accepted update in round {round_.number}")
    wrong = sorted({e["dtype"] for e in entries.values()} - {_SAFETENSORS_DTYPE[meta.dtype]})
    if wrong:
        raise Rejected("bad-dtype", f"tensors of dtype {wrong}, the metadata says {meta.dtype}")
    try:
        adapter.check_header(entries, meta, manifest.trainable)
    except adapter.AdapterError as exc:
        raise Rejected("bad-tensors", str(exc)) from None
    try:
        tensors = adapter.tensor_views(blob, entries, meta.dtype)
    except adapter.AdapterError as exc:
        raise Rejected("malformed", str(exc)) from None
    bad = adapter.find_non_finite(tensors, adapter.payload_view(blob, meta.dtype))
    if bad is not None:
        raise Rejected("non-finite", f"tensor {bad} holds NaN or infinity")
    return adapter.Adapter(meta, tensors)
