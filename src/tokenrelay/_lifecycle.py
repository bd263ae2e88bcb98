"""Lifecycle log lines: ``name key=value ...`` on the ``tokenrelay`` logger.

The names are the ones the reference design's troubleshooting greps look for
(``stream_start``, ``stream_cancelled``, ``prev_stream_finished_cleanly``, ``stream_end``), so
``grep -c stream_start`` equals ``grep -c stream_end`` on a healthy relay. Each record also
carries its fields as ``record.tokenrelay`` (a dict with an ``"event"`` key) for handlers
that want structure rather than text.
"""

from __future__ import annotations

import logging
import re

__all__ = ["format_fields", "lifecycle", "logger"]

logger = logging.getLogger("tokenrelay")

_PLAIN = re.compile(r"[A-Za-z0-9_.:/@+-]+")


def _value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    # Quote anything else, so that a session id with spaces, "=" or a newline in it can never
    # forge a field or a log line.
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped.replace("\r", "\\r") + '"'


def format_fields(fields: dict[str, object]) -> str:
    """``key=value`` pairs, logfmt style: values quoted when they need it, ``None`` as ``-``."""
    return " ".join(f"{key}={_value(value)}" for key, value in fields.items())


def lifecycle(event: str, level: int = logging.INFO, /, **fields: object) -> None:
    """Log one lifecycle line."""
    if logger.isEnabledFor(level):
        logger.log(
            level,
            "%s %s",
            event,
            format_fields(fields),
            extra={"tokenrelay": {"event": event, **fields}},
        )
