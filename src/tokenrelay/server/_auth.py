"""API keys: who may use the relay, and which sessions each key sees.

Sessions are namespaced by key. A namespace shows in logs, so it is a digest keyed with a
secret of this process: it cannot be turned back into the key, not even a weak one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import NoReturn

from ._errors import fail

__all__ = ["Keyring"]

#: The namespace of every session when the server has no keys.
OPEN = "-"


class Keyring:
    """The server's API keys, and the session namespace of each: an HMAC of the key with
    ``secret`` (a store keeps one, so that namespaces stay the same across restarts; without
    one, a random secret of this process)."""

    def __init__(self, keys: Iterable[str], secret: bytes | None = None) -> None:
        secret = secret or secrets.token_bytes(32)
        self._namespaces = {
            key: "k" + hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:12]
            for key in keys
        }

    def namespace(self, authorization: str | None) -> str | None:
        """The namespace of a request's ``Authorization`` header, ``None`` if it is not a
        valid key (every key is compared, in constant time)."""
        if not self._namespaces:
            return OPEN
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        found = None
        if scheme.lower() == "bearer" and token:
            for key, namespace in self._namespaces.items():
                if hmac.compare_digest(key.encode(), token.encode()):
                    found = namespace
        return found

    def require(self, authorization: str | None) -> str:
        """The namespace of a request's credentials; a 401 when they are wrong."""
        namespace = self.namespace(authorization)
        if namespace is None:
            _unauthorized()
        return namespace


def _unauthorized() -> NoReturn:
    fail(
        401,
        "a valid API key is required: send 'Authorization: Bearer <key>'",
        "authentication_error",
        "invalid_api_key",
        WWW_Authenticate="Bearer",
    )
