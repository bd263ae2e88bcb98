"""Errors over HTTP, in OpenAI's shape: ``{"error": {"message", "type", "code"}}``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, NoReturn

from quart import Response
from werkzeug.exceptions import HTTPException

from .._exceptions import (
    StoreUnavailable,
    UpstreamConnectError,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from .._relay import Run
from ._asgi import ReplacedResponse

__all__ = [
    "HTTPError",
    "error_body",
    "fail",
    "invalid",
    "run_error",
    "run_error_response",
    "store_unavailable",
    "too_large",
    "werkzeug_error",
]


def error_body(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response."""
    return {"error": {"message": message, "type": type_, "code": code}}


class HTTPError(Exception):
    """An error response in OpenAI's shape, raised from anywhere in a request."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type_, code)
        self.headers = dict(headers or {})

    def response(self) -> Response:
        """The error as a JSON response."""
        response = Response(json.dumps(self.body), status=self.status, mimetype="application/json")
        response.headers.update(self.headers)
        return response


def fail(
    status: int, message: str, type_: str, code: str | None = None, **headers: str
) -> NoReturn:
    """Answer the request with an error (``Retry_After="1"`` is the ``Retry-After`` header)."""
    raise HTTPError(
        status, message, type_, code, {k.replace("_", "-"): v for k, v in headers.items()}
    )


def invalid(message: str, code: str) -> NoReturn:
    """A 400 ``invalid_request_error``."""
    fail(400, message, "invalid_request_error", code)


def _too_large_error(limit: int) -> HTTPError:
    return HTTPError(
        413,
        f"the request body is over the {limit} byte limit",
        "invalid_request_error",
        "body_too_large",
    )


def too_large(limit: int) -> NoReturn:
    """A 413 for a body over ``limit`` bytes."""
    raise _too_large_error(limit)


def werkzeug_error(error: HTTPException, max_body: int) -> Response:
    """Werkzeug's own errors (404, 405, 413 while reading a body...) in OpenAI's shape, with
    their headers (a 405's ``Allow``)."""
    status = error.code or 500
    if status == 413:
        return _too_large_error(max_body).response()
    types = {404: "not_found_error", 500: "server_error"}
    message = error.description or error.name
    if status == 408:  # (Werkzeug's blames "the browser")
        message = "the request body did not arrive in time"
    response = HTTPError(status, message, types.get(status, "invalid_request_error")).response()
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


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
    if isinstance(error, StoreUnavailable):
        return 503, error_body(message, "server_error", code)
    if run.reason != "exception":  # an upstream failure, whatever its kind
        return 502, error_body(message, "upstream_error", code)
    return 500, error_body("the relay failed while producing the answer", "server_error", code)


def store_unavailable() -> NoReturn:
    """503: the store the workers share (Redis) cannot be reached now (the details are in
    the server's log, not in the answer)."""
    fail(
        503,
        "the relay's shared store cannot be reached; retry shortly",
        "server_error",
        "store_unavailable",
        Retry_After="2",
    )


def run_error_response(run: Run, headers: Mapping[str, str]) -> Response:
    """The JSON error answering a request whose run failed (with the upstream's Retry-After
    when it rate-limited us)."""
    status, body = run_error(run)
    response = Response(json.dumps(body), status=status, mimetype="application/json")
    response.headers.update(_run_error_headers(run, headers))
    return response


def run_error_answer(run: Run, headers: Mapping[str, str]) -> ReplacedResponse:
    """:func:`run_error_response`, for a stream whose response has started but not been
    written: the wrapper answers with it instead (see :class:`ReplacedResponse`)."""
    status, body = run_error(run)
    data = json.dumps(body).encode()
    fields = {
        "Content-Type": "application/json",
        "Content-Length": str(len(data)),
        **_run_error_headers(run, headers),
    }
    return ReplacedResponse(data, status, [(k.encode(), v.encode()) for k, v in fields.items()])


def _run_error_headers(run: Run, headers: Mapping[str, str]) -> dict[str, str]:
    fields = dict(headers)
    if isinstance(run.error, UpstreamRateLimited) and run.error.retry_after is not None:
        fields["Retry-After"] = str(math.ceil(run.error.retry_after))
    return fields
