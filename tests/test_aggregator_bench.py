"""bench/bench_aggregate.py: the adapter layout it measures is the export's, and every path it times really
accepts (and, where it should, spools and acknowledges) every update."""

from __future__ import annotations

import json

import pytest

from bench import bench_aggregate as bench
from flora.edge.synthetic import synthetic_manifest, vitb32_manifest


def _layout_of(manifest) -> dict:
    return {"architecture": "synthetic", "lora": {"tower": "text", "rank": 4, "alpha": 8.0,
                                                  "targets": ["q", "k", "v", "out"]},
            "trainable": [{"name": t.name, "shape": list(t.shape), "dtype": "float32"} for t in manifest.trainable]}


@pytest.mark.slow
def test_the_benchmarked_layout_is_what_a_random_init_clip_vitb32_export_has():
    pytest.importorskip("open_clip")
    layout = bench.derive_vitb32_layout()
    assert layout["architecture"] == "ViT-B-32"
    assert layout["lora"] == {"tower": "text", "rank": 8, "alpha": 16.0, "targets": ["q", "k", "v", "out"]}
    got = [(t["name"], tuple(t["shape"])) for t in layout["trainable"]]
    assert got[:2] == [("text.resblocks.0.attn.q.lora_A", (8, 512)), ("text.resblocks.0.attn.q.lora_B", (512, 8))]
    assert len(got) == 96 and got[-1][0] == "text.resblocks.11.attn.out.lora_B"
    assert got == [(t.name, tuple(t.shape)) for t in vitb32_manifest().trainable]  # the tests' stand-in agrees
    assert bench.describe_layout(layout)["floats"] == 393_216


@pytest.mark.parametrize("path", ["fold", "durable"])
def test_each_in_process_path_folds_every_update(path, tmp_path, monkeypatch):
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(_layout_of(synthetic_manifest())))
    monkeypatch.setenv("FLORA_BENCH_TMP", str(tmp_path))
    row = bench.worker(path, 7, "float32", layout)  # asserts inside: all accepted, and for durable all acked
    assert row["n"] == 7 and row["spool"] == (path == "durable") and row["payload_bytes"] == 7 * row["update_bytes"]
    assert row["mb_per_s"] > 0 and row["peak_rss_mib"] >= row["rss_before_loop_mib"] > 0


@pytest.mark.mqtt
def test_the_mqtt_path_drains_a_broker_backlog_with_acks(mosquitto_binary, tmp_path, monkeypatch):
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(_layout_of(synthetic_manifest())))
    monkeypatch.setenv("FLORA_BENCH_MANIFEST", str(layout))
    monkeypatch.setenv("FLORA_BENCH_TMP", str(tmp_path))
    row = bench.worker("mqtt", 30, "float32", layout)  # more than the broker's 20 in flight: acks keep it going
    assert row["n"] == 30 and row["payload_bytes"] == 30 * row["update_bytes"]


def test_a_benchmark_writes_its_json_and_its_table_and_prints_the_table(tmp_path, capsys):
    from bench.report_files import write_report

    report = {"rows": [{"n": 10, "mb_s": 1542.5}], "loadavg": [0.5, 0.4, 0.3]}
    write_report(tmp_path / "results", "aggregate_x", report, "| n | MB/s |\n| 10 | 1542.5 |\n")
    assert json.loads((tmp_path / "results" / "aggregate_x.json").read_text()) == report
    assert (tmp_path / "results" / "aggregate_x.md").read_text() == "| n | MB/s |\n| 10 | 1542.5 |\n"
    assert "| 10 | 1542.5 |" in capsys.readouterr().out
