"""The fleet harness at a small size: 200 devices, each its own MQTT connection, through the real flora-aggregator
process and mosquitto; every acknowledged update counted once, each global the FedAvg of exactly those."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import fleet
from bench.fleet_devices import TEMPLATES, UpdateTemplates, device_id, template_samples
from flora.edge import adapter


def test_templates_patch_each_device_id_into_a_valid_update():
    manifest = fleet.fleet_manifest("tiny")
    templates = UpdateTemplates(manifest, "float16")
    for i in (0, 7, 12345):
        blob = templates.blob(i, 3)
        got = adapter.decode(blob, manifest.trainable, model_id=manifest.model_id)
        assert (got.meta.client_id, got.meta.round, got.meta.kind, got.meta.dtype) == (device_id(i), 3, "update",
                                                                                         "float16")
        assert got.meta.num_samples == template_samples(i % TEMPLATES)
    assert templates.blob(1, 3) != templates.blob(1 + TEMPLATES, 3)  # same template, its own client id


def test_expected_global_is_the_sample_weighted_mean_of_the_templates():
    manifest = fleet.fleet_manifest("tiny")
    clients = [device_id(i) for i in (0, 1, 1 + TEMPLATES)]  # templates 0, 1, 1
    got = fleet.expected_global(manifest, "float32", clients)
    blobs = UpdateTemplates(manifest, "float32")
    flat = [fleet._flat(blobs.blob(i, 0), manifest).astype(np.float64) for i in (0, 1)]
    n0, n1 = template_samples(0), template_samples(1)
    np.testing.assert_allclose(got, (n0 * flat[0] + 2 * n1 * flat[1]) / (n0 + 2 * n1), rtol=1e-6)


@pytest.mark.mqtt
@pytest.mark.usefixtures("mosquitto_binary")
def test_two_hundred_devices_two_rounds_nothing_lost_nothing_counted_twice(tmp_path):
    row = fleet.run_config(200, "sync", "tiny", rounds=2, processes=2, window=32, timeout=240, keep=tmp_path)
    assert row["lost"] == 0 and row["double_counted"] == 0 and row["global_exact"]
    for r in row["per_round"]:
        assert r["updates"] == r["acked_by_broker"] == 200 and r["counted_not_acked"] == 0
        assert r["rejections"] == {} and r["global_max_ulps"] <= fleet.MAX_ULPS
        assert 0 < r["close_s"] < 240 and r["updates_per_s"] > 0
    assert row["connect_s"] > 0 and row["aggregator_peak_rss_mib"] > 10 and row["broker_peak_rss_mib"] > 1
    json.dumps(row)  # the row is what bench/results/fleet.json holds


@pytest.mark.mqtt
@pytest.mark.usefixtures("mosquitto_binary")
def test_two_hundred_devices_async_versions_each_the_fedbuff_step_of_exactly_its_buffer(tmp_path):
    row = fleet.run_config(200, "async", "tiny", rounds=2, processes=2, window=32, timeout=240, keep=tmp_path)
    assert row["acked"] == 200 and row["lost"] == 0 and row["double_counted"] == 0 and row["global_exact"]
    assert [r["updates"] for r in row["per_round"]] == [100, 100]  # versions of 200 / 2 updates
    assert row["per_round"][1]["staleness"]["max"] >= 1  # the second buffer holds updates from version 0
