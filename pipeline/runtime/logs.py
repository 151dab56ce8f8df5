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


#: ``extra=OUTAGE`` marks aipipe's own lines that repeat while a dependency is down (a broker, Redis):
#: ``RepeatFilter`` lets one of each kind through per window.
OUTAGE = {"outage": True}


class RepeatFilter(logging.Filter):
    """Let one line of a kind through per ``window_s`` (s): the client libraries' and aipipe's outage lines.

    While a broker is down, aiokafka logs the same connection error many times
    a second and every reader and publisher of aipipe retries; this keeps the
    first line of each kind (logger and message template) per window and
    counts the rest, reported on the next line let through as ``(N similar
    lines suppressed)``. aipipe's own lines take part when logged with
    ``extra=OUTAGE``.
    """

    def __init__(self, prefixes: tuple[str, ...] = ("aiokafka", "kafka"), window_s: float = 30.0) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.window_s = window_s
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is shown (the first of its kind in the window)."""
        if not record.name.startswith(self.prefixes) and not getattr(record, "outage", False):
            return True
        kind = (record.name, str(record.msg))
        last = self._last.get(kind)
        if last is not None and record.created - last < self.window_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._last[kind] = record.created
        skipped = self._suppressed.pop(kind, 0)
        if skipped:
            record.msg = f"{record.msg} ({skipped} similar lines suppressed)"
        return True


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
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for noisy in ("aiokafka", "kafka", "httpx", "uvicorn", "uvicorn.access", "uvicorn.error", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
