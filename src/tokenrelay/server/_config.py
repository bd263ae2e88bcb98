"""The server's configuration: every option declared once, as a field of :class:`ServerConfig`
with its help text and its parser. The command line (``tokenrelay serve --help``) and the
``TOKENRELAY_*`` environment variables are generated from these fields.

Limits that can be switched off take ``none`` (also ``off``, or ``0``) everywhere.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..upstreams._spec import parse_upstream

__all__ = ["Option", "ServerConfig", "default_max_memory", "is_loopback", "options"]

_OFF = ("none", "off", "0")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def seconds(text: str) -> float:
    """A number of seconds, >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected seconds, not {text!r}") from None
    if not value >= 0:
        raise ValueError("must be >= 0 seconds")
    return value


def seconds_or_none(text: str) -> float | None:
    """Seconds, or ``none`` (``off``, ``0``) for no limit."""
    return None if text.strip().lower() in _OFF else seconds(text)


def redis_url(text: str) -> str | None:
    """A ``redis://`` / ``rediss://`` / ``unix://`` URL, or ``none``."""
    value = text.strip()
    if value.lower() in _OFF:
        return None
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected redis://HOST:PORT/DB, rediss://... or unix://PATH")
    return value


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_or_none(text: str) -> float | None:
    """A duration: seconds, or a number with ``s``, ``m``, ``h`` or ``d`` (``7d``); or
    ``none`` (``off``, ``0``) for forever."""
    value = text.strip().lower()
    if value in _OFF:
        return None
    unit = value[-1:] if value[-1:] in _DURATION_UNITS else "s"
    number = value.removesuffix(unit) if value[-1:] in _DURATION_UNITS else value
    return seconds(number) * _DURATION_UNITS[unit]


def show_duration(value: float) -> str:
    """``value`` seconds as the options take them back: ``7d``, ``12h``, ``90``."""
    for unit in "dhm":
        if value >= _DURATION_UNITS[unit] and value % _DURATION_UNITS[unit] == 0:
            return f"{value / _DURATION_UNITS[unit]:g}{unit}"
    return f"{value:g}"


def count(text: str) -> int:
    """A positive whole number."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise ValueError("must be positive")
    return value


def count_or_none(text: str) -> int | None:
    """A positive whole number, or ``none`` (``off``, ``0``) for no limit."""
    return None if text.strip().lower() in _OFF else count(text)


def size_or_none(text: str) -> int | None:
    """A size in bytes, with an optional K, M, G or T suffix (powers of 1024, an optional
    trailing B or iB), or ``none`` (``off``, ``0``) for no limit."""
    value = text.strip().lower()
    if value in _OFF:
        return None
    number = value.removesuffix("ib").removesuffix("b")
    unit = number[-1:] if number[-1:] in _UNITS else ""
    try:
        size = float(number.removesuffix(unit)) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"expected a size such as 512M or 2G, not {text!r}") from None
    if not size >= 1:
        raise ValueError("must be at least 1 byte (or none)")
    return int(size)


def size(text: str) -> int:
    """A size in bytes (see :func:`size_or_none`), not ``none``."""
    value = size_or_none(text)
    if value is None:
        raise ValueError("must be at least 1 byte")
    return value


def port(text: str) -> int:
    """A TCP port, 0-65535 (0: any free one)."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a port number, not {text!r}") from None
    if not 0 <= value <= 65535:
        raise ValueError("must be 0-65535")
    return value


def flag(text: str) -> bool:
    """``1``, ``true``, ``yes`` or ``on`` (any case) for true; anything else is false."""
    return text.strip().lower() in ("1", "true", "yes", "on")


def show_size(value: int) -> str:
    """``value`` bytes as the options take them back: ``8M``, ``5.9G``."""
    for unit in "TGMK":
        if value >= _UNITS[unit.lower()]:
            return f"{value / _UNITS[unit.lower()]:.3g}{unit}"
    return str(value)


def default_max_memory() -> int | None:
    """A quarter of this machine's physical memory, or ``None`` where that is unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (AttributeError, ValueError, OSError):
        return None


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (``127.0.0.0/8``, ``::1``).
    A name is resolved; one that does not resolve is not loopback."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).partition("%")[0]).is_loopback for info in infos
    )


def _option(
    default: Any,
    help: str,
    parse: Callable[[str], Any] = str,
    metavar: str | None = None,
    *,
    factory: Callable[[], Any] | None = None,
) -> Any:
    metadata = {"help": help, "parse": parse, "metavar": metavar}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class ServerConfig:
    """Everything ``tokenrelay serve`` can be told. Each field is also a command-line option
    (``max_runs`` is ``--max-runs``) and an environment variable (``TOKENRELAY_MAX_RUNS``)."""

    upstream: str = _option("demo", "demo | ollama=URL | openai=URL", metavar="SPEC")
    model: str | None = _option(None, "model for requests that name none")
    upstream_api_key: str | None = _option(
        None, "API key sent to an openai= upstream", metavar="KEY"
    )
    host: str = _option("127.0.0.1", "address to listen on")
    port: int = _option(8000, "port (0: any free one)", port)
    #: Keys clients must present as ``Authorization: Bearer``; none means no authentication.
    #: (On the command line: ``--api-keys-file``, ``TOKENRELAY_API_KEY`` or ``--api-key``.)
    api_keys: tuple[str, ...] = ()
    insecure_open: bool = _option(False, "allow a non-loopback --host without API keys", flag)
    first_token_timeout: float | None = _option(
        120.0, "seconds to the first token; 'none': no limit", seconds_or_none, "S"
    )
    token_timeout: float | None = _option(
        30.0, "longest gap between tokens; 'none': no limit", seconds_or_none, "S"
    )
    grace: float = _option(
        180.0, "seconds a finished run stays resumable after its last reader left", seconds, "S"
    )
    demo_prefill: float = _option(
        0.3, "the demo model's delay before its first token", seconds, "S"
    )
    demo_token_delay: float = _option(0.02, "the demo model's delay between tokens", seconds, "S")
    max_body: int = _option(1 << 20, "largest request body (e.g. 1M)", size, "SIZE")
    body_timeout: float = _option(
        60.0,
        "seconds a request's body may take to arrive before it is answered 408 and its "
        "connection closed",
        seconds,
        "S",
    )
    max_runs: int = _option(1000, "runs at once before answering 429", count, "N")
    max_runs_per_key: int | None = _option(
        None,
        "runs at once for one API key before answering 429; 'none': half of --max-runs "
        "when there are several keys, else no limit of its own",
        count_or_none,
        "N",
    )
    max_memory: int | None = _option(
        None,
        "bytes of events all runs may hold (e.g. 2G): finished runs nobody follows are "
        "evicted first, then new runs get 503; 'none': no limit; default: a quarter of RAM",
        size_or_none,
        "SIZE",
        factory=default_max_memory,
    )
    max_events: int | None = _option(
        None, "events each run holds for replay; 'none': no limit", count_or_none, "N"
    )
    max_bytes: int | None = _option(
        8 << 20, "bytes each run holds for replay; 'none': no limit", size_or_none, "SIZE"
    )
    stall_timeout: float | None = _option(
        60.0,
        "seconds a client may take nothing of a stream's write before it stops holding its "
        "run and its connection is closed (twice that for any other response); 'none': "
        "forever",
        seconds_or_none,
        "S",
    )
    finish_timeout: float = _option(
        5.0, "the longest a run's saving may take once it ends", seconds, "S"
    )
    db: str = _option(
        "tokenrelay.db",
        "the SQLite file that keeps sessions, answers and run logs across restarts; "
        "':memory:' keeps nothing",
        metavar="PATH",
    )
    keep_events: float | None = _option(
        7 * 86400.0,
        "how long a finished run's events are kept in the file for replay (e.g. 7d, 12h); "
        "its session and answer are kept until deleted; 'none': forever",
        duration_or_none,
        "TIME",
    )
    redis: str | None = _option(
        None,
        "Redis shared by every worker and host that serve as one relay (redis://HOST:PORT/DB, "
        "rediss:// for TLS, user and password in the URL); 'none': this process alone",
        redis_url,
        "URL",
    )
    lease: float = _option(
        10.0,
        "with --redis: seconds a run's hold on its session lasts unrenewed (a dead worker's "
        "sessions are free again after it)",
        seconds,
        "S",
    )
    workers: int = _option(
        1,
        "processes sharing the port, each a full relay (more than 1 needs --redis to act as "
        "one, and --db :memory:)",
        count,
        "N",
    )
    upstream_connections: int = _option(256, "connections to the upstream at once", count, "N")
    keepalive: float = _option(
        15.0, "seconds between keep-alive comments on a quiet stream", seconds, "S"
    )

    def check(self) -> None:
        """Raise ``ValueError`` for a configuration that must not be served."""
        parse_upstream(self.upstream)
        if not (0 <= self.port <= 65535):
            raise ValueError(f"port must be 0-65535, not {self.port}")
        if not self.api_keys and not self.insecure_open and not is_loopback(self.host):
            raise ValueError(
                f"refusing to serve {self.host} without API keys: anyone who can reach it could "
                "use your model server. Give --api-keys-file (or TOKENRELAY_API_KEY), or "
                "--insecure-open if that is really what you want."
            )
        for name in ("first_token_timeout", "token_timeout", "stall_timeout", "keep_events"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 seconds (or none), not {value}")
        for name in ("grace", "keepalive", "demo_prefill", "demo_token_delay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 seconds")
        for name in ("finish_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds")
        if not self.lease > 0:
            raise ValueError("lease must be > 0 seconds")
        if self.workers > 1 and self.redis is None:
            raise ValueError(
                f"--workers {self.workers} needs --redis: without it each worker is a relay of "
                "its own, and a resume, stop or new prompt landing on another worker sees nothing"
            )
        if self.workers > 1 and self.db != ":memory:":
            raise ValueError(
                f"--workers {self.workers} needs --db :memory: (a SQLite file is one process's; "
                "Redis holds what the workers share)"
            )
        for name in ("max_body", "max_runs", "upstream_connections", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        for name in ("max_runs_per_key", "max_events", "max_bytes", "max_memory"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive (or none), not {value}")

    @property
    def runs_per_key(self) -> int | None:
        """The per-key run limit in force (see ``max_runs_per_key``)."""
        if self.max_runs_per_key is not None:
            return self.max_runs_per_key
        return max(1, self.max_runs // 2) if len(self.api_keys) > 1 else None


@dataclass(frozen=True)
class Option:
    """One :class:`ServerConfig` field as the command line and environment see it."""

    name: str
    flag: str
    env: str
    help: str
    parse: Callable[[str], Any]
    metavar: str | None
    default: Any


def options() -> list[Option]:
    """Every option of :class:`ServerConfig` that has a command-line form, in field order."""
    defaults = ServerConfig()
    found = []
    for field in dataclasses.fields(ServerConfig):
        if "help" not in field.metadata:
            continue
        found.append(
            Option(
                name=field.name,
                flag="--" + field.name.replace("_", "-"),
                env="TOKENRELAY_" + field.name.upper(),
                help=field.metadata["help"],
                parse=field.metadata["parse"],
                metavar=field.metadata["metavar"],
                default=getattr(defaults, field.name),
            )
        )
    return found
