"""The HTTP server: an OpenAI-compatible chat relay as a quart-trio Blueprint, the app that
``tokenrelay serve`` runs under hypercorn, and its configuration."""

from ._app import RelayBlueprint as RelayBlueprint
from ._app import create_app as create_app
from ._app import relay_blueprint as relay_blueprint
from ._config import ServerConfig as ServerConfig
from ._serve import CannotListen as CannotListen
from ._serve import serve as serve
from ._service import RelayService as RelayService
from ._service import relay_service as relay_service

__all__ = [
    "CannotListen",
    "RelayBlueprint",
    "RelayService",
    "ServerConfig",
    "create_app",
    "relay_blueprint",
    "relay_service",
    "serve",
]
