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

from ._server import ServerConfig, create_app

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
    if text.strip().lower() in ("none", "off", "0"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or 'none', not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _flag(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


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

    def option(
        *flags: str, env: str, default: Any, convert: Callable[[str], Any] = str, **kwargs: Any
    ) -> None:
        variable = f"TOKENRELAY_{env}"
        raw = os.environ.get(variable)
        if raw is not None and kwargs.get("action") != "append":
            try:
                default = convert(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{variable}={raw!r}: {exc}")
        shown = "none" if default is None else default
        help_text = kwargs.pop("help")
        if kwargs.get("action") not in ("store_true", "append"):
            kwargs["type"] = convert
        serve.add_argument(
            *flags, default=default, help=f"{help_text} [{variable}; default: {shown}]", **kwargs
        )

    option("--host", env="HOST", default=defaults.host, help="address to listen on")
    option("--port", env="PORT", default=defaults.port, convert=int, help="port (0: any free)")
    option(
        "--upstream",
        env="UPSTREAM",
        default=defaults.upstream,
        metavar="SPEC",
        help="demo | ollama=URL | openai=URL",
    )
    option("--model", env="MODEL", default=None, help="model for requests that name none")
    option(
        "--upstream-api-key",
        env="UPSTREAM_API_KEY",
        default=None,
        metavar="KEY",
        help="API key sent to an openai= upstream",
    )
    option(
        "--api-key",
        env="API_KEY",
        default=None,
        action="append",
        dest="api_keys",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (repeatable; the variable takes a "
        "comma-separated list)",
    )
    option(
        "--api-keys-file",
        env="API_KEYS_FILE",
        default=None,
        metavar="PATH",
        help="file of API keys, one a line ('#' comments)",
    )
    option(
        "--insecure-open",
        env="INSECURE_OPEN",
        default=False,
        convert=_flag,
        action="store_true",
        help="allow a non-loopback --host without API keys",
    )
    option(
        "--first-token-timeout",
        env="FIRST_TOKEN_TIMEOUT",
        default=defaults.first_token_timeout,
        convert=_seconds_or_none,
        metavar="S",
        help="seconds to the first token (prefill); 'none' waits forever",
    )
    option(
        "--token-timeout",
        env="TOKEN_TIMEOUT",
        default=defaults.token_timeout,
        convert=_seconds_or_none,
        metavar="S",
        help="longest gap between tokens; 'none' waits forever",
    )
    option(
        "--grace",
        env="GRACE",
        default=defaults.grace,
        convert=_seconds,
        metavar="S",
        help="seconds a finished run stays resumable after its last reader left",
    )
    option(
        "--demo-prefill",
        env="DEMO_PREFILL",
        default=defaults.demo_prefill,
        convert=_seconds,
        metavar="S",
        help="the demo model's delay before its first token",
    )
    option(
        "--demo-token-delay",
        env="DEMO_TOKEN_DELAY",
        default=defaults.demo_token_delay,
        convert=_seconds,
        metavar="S",
        help="the demo model's delay between tokens",
    )
    option(
        "--max-body",
        env="MAX_BODY",
        default=defaults.max_body,
        convert=int,
        metavar="BYTES",
        help="largest request body",
    )
    option(
        "--max-runs",
        env="MAX_RUNS",
        default=defaults.max_runs,
        convert=int,
        metavar="N",
        help="runs at once before answering 429",
    )
    option(
        "--keepalive",
        env="KEEPALIVE",
        default=defaults.keepalive,
        convert=_seconds,
        metavar="S",
        help="seconds between keep-alive comments on a quiet stream",
    )
    return parser


def _config(args: argparse.Namespace) -> ServerConfig:
    keys = list(args.api_keys or [])
    env_keys = os.environ.get("TOKENRELAY_API_KEY")
    if not keys and env_keys:
        keys = [key.strip() for key in env_keys.split(",") if key.strip()]
    if args.api_keys_file:
        for line in Path(args.api_keys_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return ServerConfig(
        upstream=args.upstream,
        model=args.model,
        upstream_api_key=args.upstream_api_key,
        host=args.host,
        port=args.port,
        api_keys=tuple(keys),
        insecure_open=args.insecure_open,
        first_token_timeout=args.first_token_timeout,
        token_timeout=args.token_timeout,
        grace=args.grace,
        demo_prefill=args.demo_prefill,
        demo_token_delay=args.demo_token_delay,
        max_body=args.max_body,
        max_runs=args.max_runs,
        keepalive=args.keepalive,
    )


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

    async def until_signal() -> None:
        with trio.open_signal_receiver(*shutdown_signals) as signals:
            async for signum in signals:
                logger.info("shutting_down signal=%s", signal.Signals(signum).name)
                break
        await service.drain()

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(hypercorn.trio.serve, app, hypercorn_config, shutdown_trigger=until_signal)
        )
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
    config = _config(args)
    try:
        config.check()
    except ValueError as exc:
        print(f"tokenrelay: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    trio.run(serve, config)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
