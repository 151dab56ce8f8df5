"""Logging set-up: level from ``LOG_LEVEL``; readable lines on a terminal, JSON lines otherwise.

Secrets never reach a log line: settings hold them in ``Secret`` values, and
the provider adapters redact keys from error messages.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from opentelemetry import trace


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``at``, ``level``, ``logger``, ``message`` (and ``exc`` when any).

    A line logged while a recording span is current (tracing on, inside a
    stage message) also has ``trace_id`` and ``span_id`` (hex), so logs and traces join.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line."""
        data = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            data["trace_id"] = f"{span.trace_id:032x}"
            data["span_id"] = f"{span.span_id:016x}"
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def setup_logging(level: str = "INFO", *, json_lines: bool | None = None) -> None:
    """Configure the root logger on stderr.

    Args:
        level: a ``logging`` level name (``DEBUG``, ``INFO``, ...).
        json_lines: force JSON (True) or text (False); default: JSON when stderr is not a terminal.
    """
    use_json = (not sys.stderr.isatty()) if json_lines is None else json_lines
    handler = logging.StreamHandler(sys.stderr)
    if use_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for noisy in ("aiokafka", "kafka", "httpx", "uvicorn", "uvicorn.access", "uvicorn.error", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
