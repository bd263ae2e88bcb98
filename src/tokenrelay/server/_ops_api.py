"""``/healthz`` and ``/metrics``: for whoever runs the relay."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from quart import Response, request

from ._service import relay_service

__all__ = ["healthz", "metrics"]


async def healthz() -> dict[str, Any]:
    """Liveness, open to anyone: it says more only to a caller with a key (or when the server
    has no keys): the upstream (kind and host, never its credentials) and the runs."""
    service = relay_service()
    if service.keys.namespace(request.headers.get("Authorization")) is None:
        return {"status": "ok"}
    relay = service.relay
    return {
        "status": "ok",
        "upstream": str(service.upstream),
        "runs_in_progress": relay.runs_in_progress if relay is not None else 0,
    }


async def metrics() -> Response:
    """The Prometheus text exposition."""
    return Response(relay_service().metrics.render(), content_type=CONTENT_TYPE_LATEST)
