"""``/healthz`` and ``/metrics``: for whoever runs the relay."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from quart import Response, request

from ._service import relay_service

__all__ = ["healthz", "metrics"]


async def healthz() -> dict[str, Any]:
    """Liveness, open to anyone: ``ok``, or ``degraded`` when the store failed to write or
    Redis cannot be reached. It
    says more only to a caller with a key (or when the server has no keys): the upstream
    (kind and host, never its credentials), the runs, the store."""
    service = relay_service()
    health = "degraded" if service.degraded else "ok"
    if service.keys.namespace(request.headers.get("Authorization")) is None:
        return {"status": health}
    relay = service.relay
    details: dict[str, Any] = {
        "status": health,
        "upstream": str(service.upstream),
        "runs_in_progress": relay.runs_in_progress if relay is not None else 0,
    }
    if service.store is not None:
        details["store"] = {"path": service.store.path, "write_errors": service.store.write_errors}
    if service.shared is not None:
        shared = service.shared
        details["redis"] = {
            "reachable": shared.healthy,
            "worker": shared.worker,
            "round_trips": shared.round_trips,
            "errors": shared.errors,
        }
    return details


async def metrics() -> Response:
    """The Prometheus text exposition."""
    return Response(relay_service().metrics.render(), content_type=CONTENT_TYPE_LATEST)
