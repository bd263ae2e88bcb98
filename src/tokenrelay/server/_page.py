"""The chat page: ``GET /`` serves one self-contained page (HTML, CSS and ES modules shipped in
``server/page/``; no build step, nothing fetched from anywhere else) that talks to the relay's
own API.

The page needs no API key to load; the API it calls does, when the server has keys (the page
asks for one and keeps it in the browser's local storage).

Its files are read once, when the Blueprint is made. They are served under
``page/<digest>/<name>``, where ``<digest>`` is a hash of all of them: the HTML (revalidated on
every load, with an ETag) names the digest, so the assets can be cached for good and a new
version is never mixed with an old one. A strict Content-Security-Policy allows scripts and
styles from the page's own origin only, no inline code, no ``eval``, no string-to-HTML sinks
(Trusted Types), and requests to the page's own origin only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from quart import Blueprint, Response, request

__all__ = ["CONTENT_SECURITY_POLICY", "PageFiles", "page_blueprint"]

#: Scripts, styles, images and requests from the page's own origin only; no inline code, no
#: eval, no HTML built from strings (``innerHTML`` throws), no framing, no plugins.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    )
)

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
_INDEX = "index.html"
#: Where the HTML names its assets; replaced by ``page/<digest>``.
_ASSETS = "{{assets}}"
_FOREVER = "public, max-age=31536000, immutable"

_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@dataclass(frozen=True)
class PageFile:
    """One file of the page, ready to serve."""

    body: bytes
    content_type: str
    etag: str


@dataclass(frozen=True)
class PageFiles:
    """The page's files, read from the package: the HTML, and the assets by name, all under
    one ``digest``."""

    digest: str
    index: PageFile
    assets: dict[str, PageFile]

    @classmethod
    def load(cls) -> PageFiles:
        """Read the page's files from ``tokenrelay/server/page``."""
        folder = resources.files(__package__ or "tokenrelay.server").joinpath("page")
        raw = {
            item.name: item.read_bytes()
            for item in folder.iterdir()
            if item.is_file() and _suffix(item.name) in _TYPES
        }
        hasher = hashlib.sha256()
        for name in sorted(raw):
            hasher.update(name.encode() + b"\0" + raw[name] + b"\0")
        digest = hasher.hexdigest()[:16]
        html = raw.pop(_INDEX).replace(_ASSETS.encode(), f"page/{digest}".encode())
        return cls(digest, _file(_INDEX, html), {name: _file(name, raw[name]) for name in raw})


def page_blueprint(files: PageFiles | None = None) -> Blueprint:
    """The chat page as a Blueprint named ``page``: ``GET /`` and ``GET /page/<digest>/<name>``.
    It asks for no API key (the relay's routes it calls do)."""
    files = files or PageFiles.load()
    bp = Blueprint("page", __name__)

    async def index() -> Response:
        """The chat page's HTML (revalidated on every load)."""
        response = _respond(files.index, "no-cache")
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return response

    async def asset(digest: str, name: str) -> Response:
        """One of the page's assets: cached for good under the current digest; under an
        older one (a page loaded before an upgrade), the current file, revalidated."""
        found = files.assets.get(name)
        if found is None:
            return _not_found()
        return _respond(found, _FOREVER if digest == files.digest else "no-cache")

    bp.add_url_rule("/", "index", index, methods=["GET"])
    bp.add_url_rule("/page/<digest>/<name>", "asset", asset, methods=["GET"])
    return bp


def _respond(found: PageFile, cache_control: str) -> Response:
    headers = {**_HEADERS, "Cache-Control": cache_control, "ETag": found.etag}
    if found.etag in _etags(request.headers.get("If-None-Match", "")):
        # b"": quart-trio cannot send an empty body given as None (docs/upstream-bugs.md).
        return Response(b"", status=304, headers=headers)
    response = Response(found.body, status=200, headers=headers)
    response.headers["Content-Type"] = found.content_type
    return response


def _not_found() -> Response:
    return Response(
        b"not found\n",
        status=404,
        headers={**_HEADERS, "Content-Type": "text/plain; charset=utf-8"},
    )


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


def _file(name: str, body: bytes) -> PageFile:
    etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
    return PageFile(body, _TYPES[_suffix(name)], etag)


def _suffix(name: str) -> str:
    return name[name.rfind(".") :] if "." in name else ""
