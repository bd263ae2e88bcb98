"""``tokenrelay serve``: the relay as a server, under hypercorn's trio worker."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig

from ._app import ServerConfig, create_app

__all__ = ["main", "serve"]

logger = logging.getLogger("tokenrelay")

_DESCRIPTION = """\
Serve an OpenAI-compatible chat endpoint (POST /v1/chat/completions) in front of a model
server, giving every chat session stop, supersede, detach-and-resume, timeouts and metrics.
With no options it relays the embedded demo model on http://127.0.0.1:8000.
Every option can also be set as an environment variable, shown in brackets."""

_EPILOG = """\
examples:
  tokenrelay serve
  tokenrelay serve --upstream ollama=http://localhost:11434 --model llama3.2
  tokenrelay serve --upstream openai=http://localhost:8000/v1 --port 9000
  TOKENRELAY_API_KEY=s3cret tokenrelay serve --host 0.0.0.0"""


def _seconds_or_none(text: str) -> float | None:
    """Seconds, or ``none`` (also ``off`` or ``0``) for no limit."""
    return None if text.strip().lower() in ("none", "off", "0") else _seconds(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _bytes_or_none(text: str) -> int | None:
    """A size in bytes, with an optional K, M, G or T suffix (powers of 1024, an optional
    trailing B or iB); ``none`` (also ``off`` or ``0``) for no limit."""
    value = text.strip().lower()
    if value in ("none", "off", "0"):
        return None
    number = value.removesuffix("ib").removesuffix("b")
    unit = number[-1:] if number[-1:] in _UNITS else ""
    try:
        size = float(number.removesuffix(unit)) * _UNITS[unit]
    except ValueError:
        message = f"expected a size such as 512M or 2G, not {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not size >= 1:
        raise argparse.ArgumentTypeError("must be at least 1 byte (or none)")
    return int(size)


def _size(value: int) -> str:
    """``value`` bytes as the CLI takes it back: ``8M``, ``5.9G``."""
    for unit in "TGMK":
        if value >= _UNITS[unit.lower()]:
            return f"{value / _UNITS[unit.lower()]:.3g}{unit}"
    return str(value)


def _count_or_none(text: str) -> int | None:
    """A positive count, or ``none`` (also ``off`` or ``0``) for no limit."""
    if text.strip().lower() in ("none", "off", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be positive (or none)")
    return value


def _flag(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


#: The options that map onto ServerConfig fields of the same name:
#: (flag, how to read a value, metavar, help).
_OPTIONS: tuple[tuple[str, Callable[[str], Any], str | None, str], ...] = (
    ("--host", str, None, "address to listen on"),
    ("--port", int, None, "port (0: any free one)"),
    ("--upstream", str, "SPEC", "demo | ollama=URL | openai=URL"),
    ("--model", str, None, "model for requests that name none"),
    ("--upstream-api-key", str, "KEY", "API key sent to an openai= upstream"),
    (
        "--first-token-timeout",
        _seconds_or_none,
        "S",
        "seconds to the first token; 'none': no limit",
    ),
    ("--token-timeout", _seconds_or_none, "S", "longest gap between tokens; 'none': no limit"),
    ("--grace", _seconds, "S", "seconds a finished run stays resumable after its last reader left"),
    ("--demo-prefill", _seconds, "S", "the demo model's delay before its first token"),
    ("--demo-token-delay", _seconds, "S", "the demo model's delay between tokens"),
    ("--max-body", int, "BYTES", "largest request body"),
    ("--max-runs", int, "N", "runs at once before answering 429"),
    (
        "--max-runs-per-key",
        _count_or_none,
        "N",
        "runs at once for one API key before answering 429; 'none': half of --max-runs "
        "when there are several keys, else no limit of its own",
    ),
    (
        "--max-memory",
        _bytes_or_none,
        "SIZE",
        "bytes of events all runs may hold (e.g. 2G): finished runs nobody follows are "
        "evicted first, then new runs get 503; 'none': no limit",
    ),
    ("--max-events", _count_or_none, "N", "events each run holds for replay; 'none': no limit"),
    ("--max-bytes", _bytes_or_none, "SIZE", "bytes each run holds for replay; 'none': no limit"),
    (
        "--stall-timeout",
        _seconds_or_none,
        "S",
        "seconds a client may leave a stream's write blocked before it stops holding its run",
    ),
    ("--finish-timeout", _seconds, "S", "the longest a run's saving may take once it ends"),
    ("--upstream-connections", int, "N", "connections to the upstream at once"),
    ("--keepalive", _seconds, "S", "seconds between keep-alive comments on a quiet stream"),
)


def _env(flag: str) -> str:
    return "TOKENRELAY_" + flag.removeprefix("--").replace("-", "_").upper()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenrelay",
        description="Make LLM token streams behave.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve the OpenAI-compatible relay",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = ServerConfig()
    for flag, convert, metavar, help_text in _OPTIONS:
        variable = _env(flag)
        default = getattr(defaults, flag.removeprefix("--").replace("-", "_"))
        if (raw := os.environ.get(variable)) is not None:
            try:
                default = convert(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{variable}={raw!r}: {exc}")
        shown = "none" if default is None else default
        if convert is _bytes_or_none and default is not None:
            shown = _size(default)
        serve.add_argument(
            flag,
            type=convert,
            default=default,
            metavar=metavar,
            help=f"{help_text} [{variable}; default: {shown}]",
        )
    serve.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY'; repeatable "
        "[TOKENRELAY_API_KEY: a comma-separated list]",
    )
    serve.add_argument(
        "--api-keys-file",
        default=os.environ.get("TOKENRELAY_API_KEYS_FILE"),
        metavar="PATH",
        help="file of API keys, one a line, '#' for comments [TOKENRELAY_API_KEYS_FILE]",
    )
    serve.add_argument(
        "--insecure-open",
        action="store_true",
        default=_flag(os.environ.get("TOKENRELAY_INSECURE_OPEN", "")),
        help="allow a non-loopback --host without API keys [TOKENRELAY_INSECURE_OPEN=1]",
    )
    return parser


def _field(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _config(args: argparse.Namespace) -> ServerConfig:
    """The server's configuration from parsed arguments. Raises ``ValueError`` for a keys
    file that cannot be read."""
    keys = list(args.api_keys or [])
    env_keys = os.environ.get("TOKENRELAY_API_KEY")
    if not keys and env_keys:
        keys = [key.strip() for key in env_keys.split(",") if key.strip()]
    if args.api_keys_file:
        try:
            text = Path(args.api_keys_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            path = args.api_keys_file
            raise ValueError(f"cannot read the API keys file {path!r}: {exc}") from None
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    options = {_field(flag): getattr(args, _field(flag)) for flag, *_ in _OPTIONS}
    return ServerConfig(**options, api_keys=tuple(keys), insecure_open=args.insecure_open)


class CannotListen(Exception):
    """The server could not listen where it was told to (port in use, unknown host...)."""


async def serve(
    config: ServerConfig,
    *,
    shutdown_signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config`` until SIGINT or SIGTERM: then stop accepting, stop every run with
    reason ``"shutdown"`` (their streams end with a chunk saying so), let ``on_finish`` run,
    and return."""
    app = create_app(config)
    service = app.extensions["tokenrelay"]
    hypercorn_config = HypercornConfig()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hypercorn_config.bind = [f"{host}:{config.port}"]
    hypercorn_config.accesslog = None
    hypercorn_config.errorlog = logging.getLogger("tokenrelay.server")
    hypercorn_config.graceful_timeout = 5.0
    # hypercorn's default of 100 drops connections when many clients arrive at once.
    hypercorn_config.backlog = 2048

    async def until_signal() -> None:
        with trio.open_signal_receiver(*shutdown_signals) as signals:
            async for signum in signals:
                logger.info("shutting_down signal=%s", signal.Signals(signum).name)
                break
        await service.drain()

    async with trio.open_nursery() as nursery:
        try:
            binds = await nursery.start(
                partial(hypercorn.trio.serve, app, hypercorn_config, shutdown_trigger=until_signal)
            )
        except* OSError as group:  # hypercorn raises it in a group of its nursery's
            error = _leaves(group)[0]
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise CannotListen(f"cannot listen on {hypercorn_config.bind[0]}: {reason}") from group
        logger.info(
            "tokenrelay listening on %s, relaying %s%s",
            binds[0],
            service.upstream,
            "" if config.api_keys else " (no API keys: anyone who can connect may use it)",
        )
        task_status.started(binds[0])


def main(argv: Sequence[str] | None = None) -> int:
    """The ``tokenrelay`` command."""
    args = _parser().parse_args(argv)
    try:
        config = _config(args)
        config.check()
    except ValueError as exc:
        print(f"tokenrelay: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    # One "HTTP Request: POST ..." line per run is noise beside the lifecycle lines.
    for name in ("httpx2", "httpcore2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.api_keys:
        logger.warning(
            "api_key_on_command_line: any user of this machine can read it in 'ps'; "
            "prefer --api-keys-file or TOKENRELAY_API_KEY"
        )
    try:
        trio.run(serve, config)
    except BaseExceptionGroup as group:
        cannot, rest = group.split(CannotListen)
        if cannot is None or rest is not None:
            raise
        print(f"tokenrelay: {_leaves(cannot)[0]}", file=sys.stderr)
        return 2
    return 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    return [
        leaf
        for exc in group.exceptions
        for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
