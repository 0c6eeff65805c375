"""Where a benchmark's results go: bench/results/<stem>.json and <stem>.md, the table also printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping


def write_report(out: Path, stem: str, report: Mapping[str, Any], table: str) -> None:
    """Write `report` as OUT/STEM.json and `table` (its markdown) as OUT/STEM.md, then print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table)
    print(table)
