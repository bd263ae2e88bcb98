"""Upstream spec strings, as the CLI and config take them: ``demo``,
``ollama=http://host:11434``, ``openai=http://host:8000/v1``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal, NamedTuple

import httpx2

from ._demo import DemoUpstream
from ._http import Upstream, http_client
from ._ollama import OllamaUpstream
from ._openai import OpenAIUpstream

__all__ = ["UpstreamSpec", "open_upstream", "parse_upstream"]

Kind = Literal["demo", "ollama", "openai"]
_KINDS: tuple[Kind, ...] = ("demo", "ollama", "openai")


class UpstreamSpec(NamedTuple):
    """A parsed upstream spec: which adapter, and where its server is."""

    kind: Kind
    url: str | None = None


def parse_upstream(spec: str) -> UpstreamSpec:
    """Parse ``demo``, ``ollama=URL`` or ``openai=URL``.

    Raises:
        ValueError: with a message showing the accepted forms.
    """
    kind, eq, url = spec.strip().partition("=")
    kind = kind.strip().lower()
    url = url.strip()
    for known in _KINDS:
        if kind == known:
            break
    else:
        raise ValueError(
            f"unknown upstream {spec!r}: use 'demo', 'ollama=http://HOST:11434' or "
            "'openai=http://HOST:PORT/v1'"
        )
    if known == "demo":
        if eq:
            raise ValueError("the demo upstream takes no URL: use just 'demo'")
        return UpstreamSpec("demo")
    if not url:
        example = "http://localhost:11434" if known == "ollama" else "http://localhost:8000/v1"
        raise ValueError(f"the {known} upstream needs a URL, e.g. '{known}={example}'")
    try:
        parsed = httpx2.URL(url)
    except httpx2.InvalidURL as exc:
        raise ValueError(f"bad {known} upstream URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"bad {known} upstream URL {url!r}: it must be http(s)://HOST[:PORT]...")
    return UpstreamSpec(known, url.rstrip("/"))


@asynccontextmanager
async def open_upstream(
    spec: str | UpstreamSpec,
    *,
    model: str | None = None,
    api_key: str | None = None,
    max_connections: int = 100,
    demo_prefill: float = 0.3,
    demo_token_delay: float = 0.02,
) -> AsyncIterator[Upstream]:
    """Open the upstream a spec names, with its own shared HTTP client (closed on exit).

    ::

        async with tokenrelay.open_upstream("ollama=http://localhost:11434") as upstream:
            async with tokenrelay.guard(upstream.stream(request), ...) as deltas:
                ...

    Args:
        spec: ``demo``, ``ollama=URL`` or ``openai=URL`` (or a parsed :class:`UpstreamSpec`).
        model: the model to use when a request names none.
        api_key: for ``openai``: sent upstream as ``Authorization: Bearer``.
        max_connections: the HTTP client's connection limit.
        demo_prefill, demo_token_delay: the demo model's pace.
    """
    if isinstance(spec, str):
        spec = parse_upstream(spec)
    if spec.kind == "demo":
        yield DemoUpstream(
            prefill=demo_prefill, token_delay=demo_token_delay, model=model or "demo"
        )
        return
    assert spec.url is not None
    async with http_client(max_connections=max_connections) as client:
        if spec.kind == "ollama":
            yield OllamaUpstream(spec.url, client, model=model)
        else:
            yield OpenAIUpstream(spec.url, client, api_key=api_key, model=model)
