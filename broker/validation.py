"""Checks on a client update before it may touch the round's average: each failure has a reason code.

The cheap checks (size, header, metadata, round, sender) run first; the tensors are then viewed in
place (no copy) and checked for NaN and infinities in one pass over the payload.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import AbstractSet, Callable, Mapping, Optional, Tuple

from flora.edge import adapter
from flora.edge.bundle import Manifest
from flora.edge.wire import short as _short

#: Every reason `validate_update` rejects an update for (the history rows count them by these codes).
VALIDATION_REASONS = (
    "oversized",        # the blob is larger than the manifest's tensors can need
    "malformed",        # not a readable FLORA adapter blob (edge.wire refused its header), not an update, or
                        # inconsistent byte offsets
    "bad-dtype",        # not float32/float16, or tensors of another dtype than the metadata says
    "bad-num-samples",  # num_samples missing, not a plain positive decimal integer, or above the cap
    "client-mismatch",  # the metadata names another client than the topic it came on
    "foreign-model",    # model_id of another bundle
    "late",             # for an earlier round
    "early",            # for a round that has not started
    "stale",            # async: based on a global more than --max-staleness versions old
    "not-asked",        # the client was not asked this round
    "duplicate",        # the client already has an accepted update this round
    "bad-tensors",      # tensor names or shapes differ from the manifest
    "non-finite",       # NaN or infinity in a tensor
)
#: Counted by the aggregator itself: an update that arrived while no round was open (in the next round's row).
NO_ROUND = "no-round"
#: Counted by the aggregator itself: an update on `update/<id>` whose id is outside the id grammar.
BAD_CLIENT_ID = "bad-client-id"
#: Counted by the aggregator itself: a strategy that keeps every update (median, trimmed mean) holds as many as
#: its memory bound allows.
STRATEGY_FULL = "strategy-full"
#: Counted by the aggregator itself, unread: an update beyond its sender's rate limit (--rate-limit).
RATE_LIMITED = "rate-limited"
REASONS = (*VALIDATION_REASONS, NO_ROUND, BAD_CLIENT_ID, STRATEGY_FULL, RATE_LIMITED)

#: The default cap on an update's num_samples (`--max-num-samples`): far above any edge device's data set,
#: and low enough that the exact integer total of a round stays below 2**53 (exact in float64) for
#: millions of updates, so the weighted float64 sums can never overflow.
DEFAULT_MAX_NUM_SAMPLES = 10 ** 9
_DECIMAL = re.compile(r"[1-9][0-9]*")  # a canonical positive decimal: no sign, space, '_' or leading zero

FLOAT_DTYPES = ("float32", "float16")
_SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", adapter.PARTIAL_DTYPE: "F64"}
#: A site's partial carries the total weight of its devices' updates: capped where float64 stops being exact.
MAX_PARTIAL_WEIGHT = 2 ** 53 - 1


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
    # async rounds: (client, base version) -> None or Rejected (stale, early, duplicate), instead of the
    # late / early / not-asked / duplicate checks of a synchronous round
    admit: Optional[Callable[[str, int], object]] = None


def check_num_samples(meta: Mapping[str, str], cap: int = DEFAULT_MAX_NUM_SAMPLES) -> int:
    """The update's num_samples as an int in [1, cap], or `Rejected("bad-num-samples")`."""
    text = meta.get("num_samples")
    if not isinstance(text, str) or not _DECIMAL.fullmatch(text):
        raise Rejected("bad-num-samples", f"num_samples={_short(text)}, need a positive decimal integer <= {cap}")
    value = int(text) if len(text) <= len(str(cap)) else cap + 1  # never parse a 4000-digit number
    if value > cap:
        raise Rejected("bad-num-samples", f"num_samples={_short(text)} is above the cap of {cap} (--max-num-samples)")
    return value


def _tensors(blob: bytes, entries, meta: adapter.AdapterMeta, manifest: Manifest):
    """Zero-copy views: one flat array when the header is `encode`'s own layout for the manifest (every
    agent's), else checked tensor by tensor."""
    try:
        fast = adapter.canonical_tensors(blob, entries, meta.dtype, manifest.trainable)
    except adapter.AdapterError as exc:
        raise Rejected("malformed", str(exc)) from None
    if fast is not None:
        return fast
    try:
        adapter.check_header(entries, meta, manifest.trainable)
    except adapter.AdapterError as exc:
        raise Rejected("bad-tensors", str(exc)) from None
    try:
        return adapter.tensor_views(blob, entries, meta.dtype)
    except adapter.AdapterError as exc:
        raise Rejected("malformed", str(exc)) from None


def _check_round(claimed: int, client: str, round_: RoundView) -> None:
    """A synchronous round: this round only, an asked client, one update each."""
    if claimed < round_.number:
        raise Rejected("late", f"for round {claimed}, current round is {round_.number}")
    if claimed > round_.number:
        raise Rejected("early", f"for round {claimed}, current round is {round_.number}")
    if round_.asked is not None and client not in round_.asked:
        raise Rejected("not-asked", f"{client} was not asked in round {round_.number}")
    if client in round_.reported:
        raise Rejected("duplicate", f"{client} already has an accepted update in round {round_.number}")


def validate_update(blob: bytes, topic_client: str, manifest: Manifest, round_: RoundView, max_bytes: int,
                    max_num_samples: int = DEFAULT_MAX_NUM_SAMPLES,
                    kinds: Tuple[str, ...] = ("update",)) -> adapter.Adapter:
    """The update with zero-copy read-only tensors, or `Rejected` with the first reason that applies.

    `kinds` adds `partial` where sites report: a float64 weighted sum whose num_samples (the total
    weight) may reach MAX_PARTIAL_WEIGHT.
    """
    if len(blob) > max_bytes:
        raise Rejected("oversized", f"{len(blob)} bytes, limit {max_bytes}")
    try:
        entries, meta_strings = adapter.read_header(blob)
    except adapter.AdapterError as exc:
        raise Rejected("malformed", str(exc)) from None
    kind = meta_strings.get("kind")
    if kind not in kinds:
        raise Rejected("malformed", f"kind is {_short(kind)}, not {' or '.join(map(repr, kinds))}")
    dtypes = (adapter.PARTIAL_DTYPE,) if kind == adapter.PARTIAL else FLOAT_DTYPES
    if meta_strings.get("dtype") not in dtypes:
        raise Rejected("bad-dtype", f"dtype {meta_strings.get('dtype')!r} of a {kind} is not one of {dtypes}")
    check_num_samples(meta_strings, MAX_PARTIAL_WEIGHT if kind == adapter.PARTIAL else max_num_samples)
    try:
        meta = adapter.AdapterMeta.from_strings(meta_strings)
    except adapter.AdapterError as exc:
        raise Rejected("malformed", str(exc)) from None
    if meta.client_id != topic_client:
        raise Rejected("client-mismatch", f"metadata says {meta.client_id!r}, topic says {topic_client!r}")
    if meta.model_id != manifest.model_id:
        raise Rejected("foreign-model", f"model_id {meta.model_id[:16]}…, expected {manifest.model_id[:16]}…")
    if round_.admit is not None:
        round_.admit(topic_client, meta.round)
    else:
        _check_round(meta.round, topic_client, round_)
    wrong = sorted({e["dtype"] for e in entries.values()} - {_SAFETENSORS_DTYPE[meta.dtype]})
    if wrong:
        raise Rejected("bad-dtype", f"tensors of dtype {wrong}, the metadata says {meta.dtype}")
    tensors = _tensors(blob, entries, meta, manifest)
    bad = adapter.find_non_finite(tensors, adapter.payload_view(blob, meta.dtype))
    if bad is not None:
        raise Rejected("non-finite", f"tensor {bad} holds NaN or infinity")
    return adapter.Adapter(meta, tensors)
