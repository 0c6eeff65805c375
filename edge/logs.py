"""Log output of the command-line tools: plain lines (the default) or one JSON object per line (`--log-format json`,
for journald and log shippers).

A JSON line has `time` (ISO 8601, UTC), `level`, `logger`, `event`, `message`, and `round`, `client`, `reason` when
the call passed them: `log.info("...", extra=fields("accepted", round=3, client="c1"))`. `event` defaults to the
logger's last name component, so every line has one.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, Dict, Optional, TextIO

FORMATS = ("plain", "json")
PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Structured fields a log call may pass in `extra` (see `fields`).
FIELDS = ("event", "round", "client", "reason")


def fields(event: str, *, round: Optional[int] = None, client: Optional[str] = None,
           reason: Optional[str] = None) -> Dict[str, Any]:
    """`extra=` for a log call: the structured fields of a JSON line (ignored by the plain format)."""
    return {"event": event, "round": round, "client": client, "reason": reason}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, strict JSON (no NaN), never more than one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: Dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": getattr(record, "event", None) or record.name.rsplit(".", 1)[-1],
            "message": record.getMessage(),
        }
        for key in FIELDS[1:]:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        try:
            return json.dumps(line, default=str, allow_nan=False, ensure_ascii=False)
        except ValueError:  # a non-finite number in a structured field: keep the line, as text
            return json.dumps({k: v if isinstance(v, str) else str(v) for k, v in line.items()}, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "plain", stream: Optional[TextIO] = None) -> None:
    """Configure the root logger once for a command-line tool (replacing handlers a previous call added)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {FORMATS}")
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(PLAIN))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_flora", False):
            root.removeHandler(old)
    handler._flora = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
