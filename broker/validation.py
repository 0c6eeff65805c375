"""Checks on a client update before it may touch the round's average: each failure has a reason code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from edge import adapter
from edge.bundle import Manifest

#: Every reason an update can be rejected for (the history rows count them by these codes).
REASONS = (
    "oversized",      # the blob is larger than the manifest's tensors can need
    "malformed",      # not a readable FLORA adapter blob, or not an update
    "client-mismatch",  # the metadata names another client than the topic it came on
    "foreign-model",  # model_id of another bundle
    "late",           # for an earlier round
    "early",          # for a round that has not started
    "not-asked",      # the client was not asked this round
    "duplicate",      # the client already has an accepted update this round
    "bad-tensors",    # names, shapes or dtype differ from the manifest
    "bad-num-samples",  # num_samples missing or not positive
    "non-finite",     # NaN or infinity in a tensor
)


@dataclass
class Rejected(Exception):
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def validate_update(
    blob: bytes,
    topic_client: str,
    manifest: Manifest,
    *,
    current_round: int,
    asked: Optional[set],
    already: set,
    max_bytes: int,
) -> adapter.Adapter:
    """The decoded update, or `Rejected` with the first reason that applies (cheap checks first)."""
    if len(blob) > max_bytes:
        raise Rejected("oversized", f"{len(blob)} bytes, limit {max_bytes}")
    try:
        entries, meta_strings = adapter.read_header(blob)
        meta = adapter.AdapterMeta.from_strings(meta_strings)
    except adapter.AdapterError as exc:
        reason = "bad-num-samples" if "num_samples" in str(exc) else "malformed"
        raise Rejected(reason, str(exc)) from None
    if meta.kind != "update":
        raise Rejected("malformed", f"kind is {meta.kind!r}, not 'update'")
    if meta.client_id != topic_client:
        raise Rejected("client-mismatch", f"metadata says {meta.client_id!r}, topic says {topic_client!r}")
    if meta.model_id != manifest.model_id:
        raise Rejected("foreign-model", f"model_id {meta.model_id[:16]}…, expected {manifest.model_id[:16]}…")
    if meta.round < current_round:
        raise Rejected("late", f"for round {meta.round}, current round is {current_round}")
    if meta.round > current_round:
        raise Rejected("early", f"for round {meta.round}, current round is {current_round}")
    if asked is not None and topic_client not in asked:
        raise Rejected("not-asked", f"{topic_client} was not asked in round {current_round}")
    if topic_client in already:
        raise Rejected("duplicate", f"{topic_client} already has an accepted update in round {current_round}")
    try:
        adapter.check_header(entries, meta, manifest.trainable)
        decoded = adapter.decode(blob, check_finite=False)
    except adapter.AdapterError as exc:
        raise Rejected("bad-tensors", str(exc)) from None
    for name, arr in decoded.tensors.items():
        if not np.isfinite(arr).all():
            raise Rejected("non-finite", f"tensor {name} holds NaN or infinity")
    return decoded
