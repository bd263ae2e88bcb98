"""How the chat page is served, without a browser: only when asked for in
``relay_blueprint``, under the Blueprint's prefix, with no API key even when the relay has
keys, and revalidated by ETag."""

from __future__ import annotations

import re

import httpx2
import trio
from quart_trio import QuartTrio

import tokenrelay
from _server_helpers import serve_app
from tokenrelay.server._page import CONTENT_SECURITY_POLICY, PageFiles


async def test_relay_blueprint_serves_the_page_only_when_asked(nursery: trio.Nursery) -> None:
    plain = QuartTrio("plain")
    plain.register_blueprint(tokenrelay.relay_blueprint(tokenrelay.ServerConfig(db=":memory:")))
    plain_url = await serve_app(nursery, plain)
    async with httpx2.AsyncClient(base_url=plain_url) as client:
        assert (await client.get("/")).status_code == 404
        assert (await client.get("/healthz")).status_code == 200


async def test_the_page_under_a_prefix_needs_no_key(nursery: trio.Nursery) -> None:
    app = QuartTrio("mine")
    config = tokenrelay.ServerConfig(db=":memory:", api_keys=("sesame",))
    app.register_blueprint(tokenrelay.relay_blueprint(config, page=True), url_prefix="/relay")
    url = await serve_app(nursery, app)
    async with httpx2.AsyncClient(base_url=url) as client:
        page = await client.get("/relay/")
        assert page.status_code == 200
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        # Relative links: the assets and the API are found under the prefix.
        [script] = re.findall(r'<script type="module" src="([^"]+)"', page.text)
        assert re.fullmatch(r"page/[0-9a-f]{16}/app\.js", script)
        asset = await client.get("/relay/" + script)
        assert asset.status_code == 200
        assert asset.headers["content-type"] == "text/javascript; charset=utf-8"
        assert (await client.get("/relay/v1/sessions")).status_code == 401
        authorized = {"Authorization": "Bearer sesame"}
        assert (await client.get("/relay/v1/sessions", headers=authorized)).status_code == 200
        # Revalidation: any of the tags given, weak or strong, matches.
        etag = page.headers["etag"]
        for header in (etag, f'"other", W/{etag}'):
            again = await client.get("/relay/", headers={"If-None-Match": header})
            assert again.status_code == 304
            assert again.content == b""
            assert again.headers["etag"] == etag
        stale = await client.get("/relay/", headers={"If-None-Match": '"other"'})
        assert stale.status_code == 200


def test_the_page_files_come_from_the_package_under_one_digest() -> None:
    files = PageFiles.load()
    assert set(files.assets) == {"app.js", "markdown.js", "style.css", "icon.svg"}
    assert f"page/{files.digest}/app.js".encode() in files.index.body
    assert b"{{assets}}" not in files.index.body
    assert PageFiles.load() == files  # the same files, the same digest and tags
