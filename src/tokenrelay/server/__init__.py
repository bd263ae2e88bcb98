"""The HTTP server: an OpenAI-compatible chat relay as a quart-trio Blueprint, the app that
``tokenrelay serve`` runs under hypercorn, and its configuration."""

from ._app import RelayService as RelayService
from ._app import ServerConfig as ServerConfig
from ._app import create_app as create_app
from ._app import relay_blueprint as relay_blueprint

__all__ = ["RelayService", "ServerConfig", "create_app", "relay_blueprint"]
