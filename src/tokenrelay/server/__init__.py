"""The HTTP server: an OpenAI-compatible chat relay as a quart-trio Blueprint, the app that
``tokenrelay serve`` runs under hypercorn, and its configuration."""

from ._app import create_app as create_app
from ._app import relay_blueprint as relay_blueprint
from ._config import ServerConfig as ServerConfig
from ._service import RelayService as RelayService

__all__ = ["RelayService", "ServerConfig", "create_app", "relay_blueprint"]
