"""Errors over HTTP, in OpenAI's shape: ``{"error": {"message", "type", "code"}}``."""

from __future__ import annotations

from typing import Any

from .._exceptions import (
    UpstreamConnectError,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from .._relay import Run

__all__ = ["error_body", "run_error"]


def error_body(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response."""
    return {"error": {"message": message, "type": type_, "code": code}}


def run_error(run: Run) -> tuple[int, dict[str, Any]]:
    """The HTTP status and error body for a run that ended in ``ERROR``: 504 when the upstream
    timed out, 429 when it rate-limited us, 502 for its other failures, 500 for a bug."""
    error = run.error
    message = str(error) if error is not None else "the run failed"
    code = run.reason
    if isinstance(error, UpstreamTimeout):
        return 504, error_body(message, "upstream_timeout", code)
    if isinstance(error, UpstreamConnectError) and error.timed_out:
        return 504, error_body(message, "upstream_timeout", code)
    if isinstance(error, UpstreamRateLimited):
        return 429, error_body(message, "upstream_rate_limited", code)
    if run.reason != "exception":  # an upstream failure, whatever its kind
        return 502, error_body(message, "upstream_error", code)
    return 500, error_body("the relay failed while producing the answer", "server_error", code)
