"""``/v1/models``: the upstream's models, in OpenAI's shape (what chat UIs ask first)."""

from __future__ import annotations

from typing import Any, NoReturn

import trio

from .._exceptions import UpstreamConnectError, UpstreamError
from ._errors import fail
from ._service import RelayService, relay_service

__all__ = ["CACHE_SECONDS", "model", "models"]

#: How long a model list is reused before the upstream is asked again.
CACHE_SECONDS = 10.0


async def models() -> dict[str, Any]:
    """``GET /v1/models``: every model the upstream serves."""
    return {"object": "list", "data": await _listed(relay_service())}


async def model(model_id: str) -> dict[str, Any]:
    """``GET /v1/models/{id}``: one of them, or a 404."""
    for entry in await _listed(relay_service()):
        if entry["id"] == model_id:
            return entry
    fail(404, f"the upstream has no model {model_id!r}", "invalid_request_error", "model_not_found")


async def _listed(service: RelayService) -> list[dict[str, Any]]:
    cached = service.models_cache
    now = trio.current_time()
    if cached is not None and cached[0] > now:
        await trio.lowlevel.checkpoint()
        return cached[1]
    assert service.upstream is not None
    try:
        listed = await service.upstream.models()
    except UpstreamError as exc:
        _unlisted(exc)
    service.models_cache = (now + CACHE_SECONDS, listed)
    return listed


def _unlisted(exc: UpstreamError) -> NoReturn:
    timed_out = isinstance(exc, UpstreamConnectError) and exc.timed_out
    fail(
        504 if timed_out else 502,
        f"could not list the upstream's models: {exc}",
        "upstream_timeout" if timed_out else "upstream_error",
        "models_unavailable",
    )
