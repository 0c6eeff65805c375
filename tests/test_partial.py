"""The `partial` adapter blob (a site's float64 weighted sum and total weight) and the root's fold of partials:
FedAvg splits exactly because it is a sum."""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import pytest

from flora.broker.strategies import FedAvg, Strategy
from flora.broker.validation import MAX_PARTIAL_WEIGHT, Rejected, RoundView, validate_update
from flora.edge import adapter
from flora.edge.synthetic import encode_update, random_adapter, synthetic_manifest

M = synthetic_manifest(blocks=2, width=16, rank=4)
LIMIT = adapter.max_blob_bytes(M.trainable, itemsize=8)
KINDS = ("update", "partial")


def site_partial(site: str, updates: List[Tuple[Dict[str, np.ndarray], int]], rnd: int = 2) -> bytes:
    """What a site aggregator publishes upstream after folding its devices' updates."""
    fold = FedAvg()
    fold.begin_round(M.trainable, {})
    for tensors, n in updates:
        fold.accumulate(tensors, n)
    weighted_sum, weight = fold.partial()
    return adapter.encode(weighted_sum, model_id=M.model_id, round=rnd, kind="partial", dtype="float64",
                          client_id=site, num_samples=weight, num_updates=len(updates))


def test_a_partial_is_float64_names_its_site_weight_and_update_count():
    blob = site_partial("site-a", [(random_adapter(M, 1), 3), (random_adapter(M, 2), 5)])
    got = adapter.decode(blob, M.trainable, model_id=M.model_id)
    assert (got.meta.kind, got.meta.dtype, got.meta.client_id, got.meta.num_samples, got.meta.num_updates) == (
        "partial", "float64", "site-a", 8, 2)
    name = M.trainable[0].name
    expected = 3 * random_adapter(M, 1)[name].astype(np.float64) + 5 * random_adapter(M, 2)[name].astype(
        np.float64)
    np.testing.assert_array_equal(got.tensors[name], expected)  # the sum, not the mean, in float64
    numel = sum(t.numel for t in M.trainable)
    assert adapter.payload_view(blob, "float64").nbytes == 8 * numel  # why the root allows 8 bytes a value
    assert adapter.max_blob_bytes(M.trainable) + 4 * numel == LIMIT
    good = random_adapter(M, 1)
    for bad in (dict(kind="partial", dtype="float32", client_id="s", num_samples=1, num_updates=1),  # not float64
                dict(kind="partial", dtype="float64", client_id="s", num_samples=1),  # no num_updates
                dict(kind="partial", dtype="float64", num_samples=1, num_updates=1),  # no site
                dict(kind="partial", dtype="float64", client_id="s", num_samples=0, num_updates=1),
                dict(kind="update", dtype="float64", client_id="s", num_samples=1),  # only partials are float64
                dict(kind="global", dtype="float64")):
        with pytest.raises(adapter.AdapterError):
            adapter.encode(good, model_id=M.model_id, round=0, **bad)


def test_the_root_accepts_partials_only_where_sites_report():
    blob = site_partial("site-a", [(random_adapter(M, 1), 3)])
    view = RoundView(2, {"site-a"}, set())
    with pytest.raises(Rejected) as err:
        validate_update(blob, "site-a", M, view, LIMIT)  # a root without sites: only updates
    assert err.value.reason == "malformed"
    got = validate_update(blob, "site-a", M, view, LIMIT, kinds=KINDS)
    assert got.meta.kind == "partial" and isinstance(got.tensors, adapter.FlatTensors)
    with pytest.raises(Rejected) as err:
        validate_update(blob, "site-b", M, RoundView(2, {"site-b"}, set()), LIMIT, kinds=KINDS)
    assert err.value.reason == "client-mismatch"
    # a site's weight may exceed a device's cap (it is many devices), not float64's exact integers
    heavy = adapter.encode(random_adapter(M, 1), model_id=M.model_id, round=2, kind="partial", dtype="float64",
                           client_id="site-a", num_samples=MAX_PARTIAL_WEIGHT + 1, num_updates=1)
    with pytest.raises(Rejected) as err:
        validate_update(heavy, "site-a", M, view, LIMIT, kinds=KINDS)
    assert err.value.reason == "bad-num-samples"
    nan = random_adapter(M, 1)
    nan[M.trainable[0].name][0, 0] = np.nan
    with pytest.raises(Rejected) as err:
        validate_update(site_partial("site-a", [(nan, 1)]), "site-a", M, view, LIMIT, kinds=KINDS)
    assert err.value.reason == "non-finite"


def test_folding_partials_at_the_root_is_the_flat_fedavg_of_every_update():
    updates = [(random_adapter(M, seed, scale=0.3), n) for seed, n in zip(range(6), (7, 1, 12, 3, 9, 40))]
    flat = FedAvg()
    flat.begin_round(M.trainable, {})
    for tensors, n in updates:
        flat.accumulate(tensors, n)
    expected = flat.finalize()

    root = FedAvg()
    root.begin_round(M.trainable, {})
    view = RoundView(2, {"site-a", "site-b", "dev-9"}, set())
    for site, part in (("site-a", updates[:3]), ("site-b", updates[3:5])):
        got = validate_update(site_partial(site, part), site, M, view, LIMIT, kinds=KINDS)
        root.accumulate_partial(got.tensors, got.meta.num_samples)
    device = encode_update(M, updates[5][0], "dev-9", 2, updates[5][1])
    direct = validate_update(device, "dev-9", M, view, LIMIT, kinds=KINDS)
    root.accumulate(direct.tensors, direct.meta.num_samples)  # a device on the root broker itself
    out = root.finalize()
    assert root.total_samples == flat.total_samples == 72 and root.count == 3
    for name, value in expected.items():
        np.testing.assert_allclose(out[name], value, rtol=0, atol=1e-7)


def test_a_strategy_whose_aggregate_is_not_a_sum_refuses_partials():
    class Median(Strategy):  # a stand-in for a robust strategy: not a sum, so it cannot split across sites
        name = "median"

        def begin_round(self, specs, current_global):
            pass

        def accumulate(self, tensors, num_samples):
            pass

        def finalize(self):
            return None

        @property
        def count(self):
            return 0

    assert FedAvg.folds_partials and not Median.folds_partials
    with pytest.raises(ValueError, match="cannot fold a site's partial"):
        Median().accumulate_partial({}, 1)
    with pytest.raises(ValueError, match="cannot make a partial"):
        Median().partial()
    empty = FedAvg()
    empty.begin_round(M.trainable, {})
    assert empty.partial() is None
