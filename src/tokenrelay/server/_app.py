"""The relay's routes as one quart-trio Blueprint, and the app ``tokenrelay serve`` runs."""

from __future__ import annotations

from quart import Blueprint, Quart, Response, current_app, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .._exceptions import InvalidRequest
from ._asgi import close_connections, hold_head
from ._chat_api import chat_completions
from ._config import ServerConfig
from ._errors import HTTPError, werkzeug_error
from ._models_api import model, models
from ._ops_api import healthz, metrics
from ._page import page_blueprint
from ._responses_api import (
    cancel_response,
    create_response,
    delete_response,
    response_input_items,
    retrieve_response,
)
from ._service import EXTENSION, RelayService, relay_service
from ._sessions_api import delete, messages, resume, sessions, status, stop

__all__ = ["RelayBlueprint", "RelayService", "ServerConfig", "create_app", "relay_blueprint"]

#: Routes open to anyone, even when the server has API keys (the chat page asks for a key
#: itself, for the API it calls).
_OPEN = frozenset({"tokenrelay.healthz", "tokenrelay.page.index", "tokenrelay.page.asset"})


class RelayBlueprint(Blueprint):
    """The relay's Blueprint (made by :func:`relay_blueprint`).

    Attributes:
        service: the relay behind its routes (also ``app.extensions["tokenrelay"]`` once
            registered, and :func:`relay_service` within a request).
    """

    def __init__(self, service: RelayService) -> None:
        super().__init__("tokenrelay", __name__)
        self.service = service


def relay_blueprint(config: ServerConfig | None = None, *, page: bool = False) -> RelayBlueprint:
    """The relay's routes as a Blueprint, to mount in your own quart-trio app::

        app.register_blueprint(tokenrelay.relay_blueprint(tokenrelay.ServerConfig(...)))

    Registering it puts its :class:`RelayService` in ``app.extensions["tokenrelay"]`` (one per
    app), and wraps the app's ASGI callable so that connections are closed when they should be
    (see docs/upstream-bugs.md). The relay starts with the app (``before_app_serving``, in the
    app's lifespan nursery) and stops with it; serve the app with
    :func:`tokenrelay.server.serve` for the relay's graceful shutdown on SIGINT/SIGTERM. Set
    your app's ``MAX_CONTENT_LENGTH`` too: the routes refuse bodies over ``config.max_body``
    after reading them, Quart refuses longer ones while reading. Its errors are OpenAI-shaped
    JSON on its own routes only.

    With ``page=True`` it also serves the chat page at ``/`` (under the Blueprint's prefix):
    HTML, CSS and JS from the package, no API key needed to load it (see
    :mod:`tokenrelay.server._page`).
    """
    service = RelayService(config or ServerConfig())
    bp = RelayBlueprint(service)
    if page:
        bp.register_blueprint(page_blueprint())

    def install(app: Quart) -> None:
        if EXTENSION in app.extensions:
            raise RuntimeError("this app already has a tokenrelay blueprint: one per app")
        app.extensions[EXTENSION] = service
        close_connections(app)

    bp.record_once(lambda state: install(state.app))  # type: ignore[arg-type]
    bp.before_app_serving(_start)
    bp.after_app_serving(_stop)
    bp.before_request(_before_request)
    bp.register_error_handler(HTTPError, _http_error)
    bp.register_error_handler(InvalidRequest, _invalid_request)
    bp.register_error_handler(HTTPException, _werkzeug_error)

    bp.add_url_rule("/healthz", view_func=healthz, methods=["GET"])
    bp.add_url_rule("/metrics", view_func=metrics, methods=["GET"])
    bp.add_url_rule("/v1/chat/completions", view_func=chat_completions, methods=["POST"])
    bp.add_url_rule("/v1/models", view_func=models, methods=["GET"])
    bp.add_url_rule("/v1/models/<path:model_id>", view_func=model, methods=["GET"])
    # A path with an empty session id ("/v1/sessions//stop") is a 404, not a redirect.
    bp.add_url_rule("/v1/sessions", view_func=sessions, methods=["GET"])
    for rule, view, method in (
        ("/v1/sessions/<session_id>/stream", resume, "GET"),
        ("/v1/sessions/<session_id>/stop", stop, "POST"),
        ("/v1/sessions/<session_id>/messages", messages, "GET"),
        ("/v1/sessions/<session_id>", status, "GET"),
        ("/v1/sessions/<session_id>", delete, "DELETE"),
    ):
        bp.add_url_rule(rule, view_func=view, methods=[method], merge_slashes=False)
    bp.add_url_rule("/v1/responses", view_func=create_response, methods=["POST"])
    one = "/v1/responses/<response_id>"
    bp.add_url_rule(one, view_func=retrieve_response, methods=["GET"], merge_slashes=False)
    bp.add_url_rule(one, view_func=delete_response, methods=["DELETE"], merge_slashes=False)
    bp.add_url_rule(
        one + "/cancel", view_func=cancel_response, methods=["POST"], merge_slashes=False
    )
    bp.add_url_rule(
        one + "/input_items", view_func=response_input_items, methods=["GET"], merge_slashes=False
    )
    return bp


async def _start() -> None:
    await relay_service().start(current_app.nursery)  # type: ignore[attr-defined]


async def _stop() -> None:
    await relay_service().stop()


async def _before_request() -> None:
    # One hook, not one per step: Quart finds and awaits each hook on every request.
    # The relay's own responses write their first piece at once: their heads wait for it.
    hold_head(request.scope)
    if request.endpoint not in _OPEN:
        g.tokenrelay_namespace = relay_service().keys.require(request.headers.get("Authorization"))


async def _http_error(error: HTTPError) -> Response:
    return error.response()


async def _invalid_request(error: InvalidRequest) -> Response:
    return HTTPError(400, str(error), "invalid_request_error", "invalid_request").response()


async def _werkzeug_error(error: HTTPException) -> Response:
    return werkzeug_error(error, relay_service().config.max_body)


def create_app(config: ServerConfig | None = None) -> QuartTrio:
    """A quart-trio app serving the relay and its chat page at ``/`` (what ``tokenrelay
    serve`` runs under hypercorn); its service is ``app.extensions["tokenrelay"]``."""
    config = config or ServerConfig()
    app = QuartTrio("tokenrelay")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body
    app.config["BODY_TIMEOUT"] = config.body_timeout
    # "/v1/sessions//stop" is a bad path (404), not a redirect to "/v1/sessions/stop".
    app.url_map.merge_slashes = False
    app.register_blueprint(relay_blueprint(config, page=True))

    @app.errorhandler(HTTPException)
    async def any_http_error(error: HTTPException) -> Response:
        return werkzeug_error(error, config.max_body)

    return app
