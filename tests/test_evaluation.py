"""Server-side evaluation (`--eval-data`): an undecodable image is left out with a warning, never fatal."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flora.broker.evaluation import HeldOutEvaluator


def test_held_out_evaluation_skips_an_undecodable_image(tiny_text_bundle, tmp_path, caplog):
    rng = np.random.default_rng(0)
    for name in ("zero", "one", "two"):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "one" / "torn.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with caplog.at_level("WARNING"):
        evaluator = HeldOutEvaluator(tiny_text_bundle, tmp_path)
    assert evaluator.skipped == 1 and any("torn.png" in r.getMessage() for r in caplog.records)
    initial = {t.name: np.zeros(t.shape, np.float32) for t in tiny_text_bundle.manifest.trainable}
    result = evaluator(initial)
    assert result["test_samples"] == 12 and 0.0 <= result["test_accuracy"] <= 1.0
    assert np.isfinite(result["test_loss"])
    for path in tmp_path.rglob("*.png"):
        if path.name != "torn.png":
            path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="none of the evaluation images"):
        HeldOutEvaluator(tiny_text_bundle, tmp_path)
