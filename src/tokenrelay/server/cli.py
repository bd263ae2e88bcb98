"""``tokenrelay serve``: the relay as a server, under hypercorn's trio worker."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.utils import LifespanFailureError

from .._exceptions import StoreUnavailable
from ..stores._redis import open_redis_store
from ..stores._sqlite import SQLiteStore
from ._app import create_app
from ._config import (
    Option,
    ServerConfig,
    duration_or_none,
    flag,
    options,
    show_duration,
    show_size,
    size,
    size_or_none,
)
from ._serve import CannotListen, leaves
from ._serve import serve as serve_app

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


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse``, with its ``ValueError`` as argparse's error (so the message shows)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _shown(option: Option, value: Any) -> str:
    if value is None:
        return "none"
    if option.parse in (size, size_or_none):
        return show_size(value)
    if option.parse is duration_or_none:
        return show_duration(value)
    return str(value)


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
    for option in options():  # ServerConfig's fields, each with its help and parser
        default = option.default
        if (raw := os.environ.get(option.env)) is not None:
            try:
                default = option.parse(raw)
            except ValueError as exc:
                parser.error(f"{option.env}={raw!r}: {exc}")
        if option.parse is flag:
            serve.add_argument(
                option.flag,
                action="store_true",
                default=default,
                help=f"{option.help} [{option.env}=1]",
            )
            continue
        serve.add_argument(
            option.flag,
            type=_argument_type(option.parse),
            default=default,
            metavar=option.metavar,
            help=f"{option.help} [{option.env}; default: {_shown(option, default)}]",
        )
    serve.add_argument(
        "--api-keys-file",
        default=os.environ.get("TOKENRELAY_API_KEYS_FILE"),
        metavar="PATH",
        help="file of the API keys clients must present as 'Authorization: Bearer KEY', one "
        "a line, '#' for comments [TOKENRELAY_API_KEYS_FILE; or TOKENRELAY_API_KEY: a "
        "comma-separated list]",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help="an API key, repeatable (it shows in 'ps': prefer --api-keys-file)",
    )
    return parser


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
    settings = {option.name: getattr(args, option.name) for option in options()}
    return ServerConfig(**settings, api_keys=tuple(keys))


async def serve(
    config: ServerConfig,
    *,
    shutdown_signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
    tune_gc: bool = False,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config`` until SIGINT or SIGTERM: then stop accepting, stop every run with
    reason ``"shutdown"`` (their streams end with a chunk saying so), let ``on_finish`` run,
    and return. ``tune_gc``: tune this process's garbage collector once listening (the
    ``tokenrelay`` command's own process does; see ``_settle_gc``)."""
    app = create_app(config)
    hypercorn_config = HypercornConfig()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hypercorn_config.bind = [f"{host}:{config.port}"]
    if (listen_fd := os.environ.get(LISTEN_FD)) is not None:
        hypercorn_config.bind = [f"fd://{int(listen_fd)}"]  # a worker: its supervisor's socket
    hypercorn_config.accesslog = None
    hypercorn_config.errorlog = logging.getLogger("tokenrelay.server")
    hypercorn_config.graceful_timeout = 5.0
    # hypercorn's default of 100 drops connections when many clients arrive at once.
    hypercorn_config.backlog = 2048
    supervisor_gone = trio.Event()
    async with trio.open_nursery() as nursery:
        lifeline = os.environ.pop(LIFELINE_FD, None)

        async def serving(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await serve_app(
                app,
                hypercorn_config,
                shutdown_signals=shutdown_signals,
                shutdown=supervisor_gone,
                # A worker gets its supervisor's SIGTERM and, from a terminal or systemd,
                # the signal its process group got too: its supervisor says when it is "now".
                second_signal=lifeline is None,
                task_status=task_status,
            )
            nursery.cancel_scope.cancel()  # served: the lifeline need not be watched

        if lifeline is not None:
            await nursery.start(_watch_lifeline, int(lifeline), supervisor_gone)
        binds = await nursery.start(serving)
        if tune_gc:
            _settle_gc()
        logger.info(
            "tokenrelay listening on %s, relaying %s%s",
            binds[0],
            app.extensions["tokenrelay"].upstream,
            "" if config.api_keys else " (no API keys: anyone who can connect may use it)",
        )
        task_status.started(binds[0])


#: The garbage collector's first threshold in a serving process (Python's default is 700).
GC_THRESHOLD = 5000


def _settle_gc() -> None:
    """Tune the garbage collector for a serving process, once it has started.

    Everything made until now (modules, the app, its routes: some 120,000 objects) lives as
    long as the process, yet each full collection walked all of it again: 40 ms or more,
    every few seconds under load, stalling every stream at once. Frozen after one last
    collection, it is never walked again. And collections of the youngest generation, which
    a streamed token's allocations set off every few tokens, are made rarer. Measured at 100
    streams (``python -m benchmarks``): 11 µs per token spent collecting, 4 µs after.
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, middle, oldest)


async def supervise(
    config: ServerConfig,
    argv: Sequence[str],
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> int:
    """``--workers N``: listen on the port, and run N ``tokenrelay serve`` processes that all
    accept on it (the kernel spreads connections between them), each a full relay on the
    shared Redis. SIGINT and SIGTERM are passed on to them; once they have all shut down
    (killed if they take longer than ``SHUTDOWN_GRACE``), this returns 0. A worker that dies
    meanwhile is replaced, unless workers keep dying at once (``FAST_FAILURES`` in a row):
    then all are stopped and this returns 1. Workers die with their supervisor."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    try:
        listener = socket.create_server((config.host, config.port), family=family, backlog=2048)
    except OSError as exc:
        where = f"{config.host}:{config.port}"
        raise CannotListen(f"cannot listen on {where}: {exc.strerror}") from None
    listener.set_inheritable(True)
    host, port = listener.getsockname()[:2]
    url = f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"
    command = [sys.executable, "-m", "tokenrelay", "serve", *argv, "--workers", "1"]
    # The workers' lifeline: they hold one end of a socket pair whose other end only this
    # process holds (and never writes to), so they read EOF when it ends, however it ends.
    # (Not PR_SET_PDEATHSIG: that signals when the *thread* that started a child ends, and
    # trio starts processes from worker threads that end after 10 s idle.)
    lifeline, held = socket.socketpair()
    env = {
        **os.environ,
        LISTEN_FD: str(listener.fileno()),
        LIFELINE_FD: str(lifeline.fileno()),
    }
    processes: set[trio.Process] = set()
    stopping = trio.Event()
    failures = 0
    exit_code = 0

    async def worker(number: int) -> None:
        nonlocal failures, exit_code
        while not stopping.is_set():
            process = await trio.lowlevel.open_process(
                command, env=env, pass_fds=(listener.fileno(), lifeline.fileno())
            )
            processes.add(process)
            started = trio.current_time()
            code = await process.wait()
            processes.discard(process)
            if stopping.is_set():
                return
            fast = trio.current_time() - started < FAST_EXIT
            failures = failures + 1 if fast else 0
            if failures >= FAST_FAILURES:
                logger.error("workers_failing: %d exited at once in a row; stopping", failures)
                exit_code = 1
                stopping.set()
                return
            logger.error(
                "worker_exited worker=%d pid=%d code=%s: starting another",
                number,
                process.pid,
                code,
            )
            if fast:
                await trio.sleep(FAST_EXIT)  # one that cannot start is not restarted in a loop

    async def shut_down() -> None:
        await stopping.wait()
        for process in list(processes):
            process.send_signal(signal.SIGTERM)
        with trio.move_on_after(SHUTDOWN_GRACE):
            for process in list(processes):
                await process.wait()
        for process in list(processes):
            process.kill()

    async def on_signal() -> None:
        # Every signal is taken, to the end (one left would be raised again as the receiver
        # closes): the first stops the workers gracefully, a second kills them.
        async for signum in signals:
            name = signal.Signals(signum).name
            if not stopping.is_set():
                logger.info("shutting_down signal=%s workers=%d", name, config.workers)
                stopping.set()
            else:
                logger.warning("shutting_down_now signal=%s: the workers are killed", name)
                for process in list(processes):
                    process.kill()

    with (
        listener,
        lifeline,
        held,
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
    ):
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(on_signal)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(shut_down)
                    for number in range(config.workers):
                        nursery.start_soon(worker, number)
                    logger.info("tokenrelay listening on %s with %d workers", url, config.workers)
                    task_status.started(url)
                # Every worker has exited (after a signal, or failing).
                outer.cancel_scope.cancel()
        finally:
            for process in processes:
                process.kill()
    return exit_code


#: Set for a worker process: the file descriptor of the socket its supervisor listens on.
LISTEN_FD = "TOKENRELAY_LISTEN_FD"

#: Set for a worker process: its end of a socket pair that reads EOF once its supervisor ends.
LIFELINE_FD = "TOKENRELAY_LIFELINE_FD"

#: A worker that exits sooner than this after it started "failed at once".
FAST_EXIT = 1.0

#: Workers failing at once this many times in a row stop the supervisor.
FAST_FAILURES = 5

#: How long the workers get to drain after SIGTERM before they are killed.
SHUTDOWN_GRACE = 15.0


async def _watch_lifeline(
    fd: int, gone: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """In a worker: set ``gone`` (the server then shuts down as on SIGTERM) once its
    supervisor has ended, which the lifeline tells by reading EOF."""
    task_status.started()
    await trio.lowlevel.wait_readable(fd)
    logger.warning("supervisor_gone: shutting down")
    gone.set()


class LogFormatter(logging.Formatter):
    """``%(asctime)s %(message)s``, written exactly as logging's own formatter writes it, with
    each second's date and time formatted once instead of once per line (``time.strftime``
    is most of a line's formatting)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s")
        self._stamp: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second, stamp = self._stamp  # one tuple: a thread logging meanwhile sees a whole one
        if second != int(record.created):
            second = int(record.created)
            stamp = time.strftime(self.default_time_format, self.converter(second))
            self._stamp = (second, stamp)
        msec_format = self.default_msec_format
        return stamp if msec_format is None else msec_format % (stamp, record.msecs)


def _configure_logging() -> None:
    """The server's log: its lines on stderr, at INFO. Two lifecycle lines per run, so a line
    is made without what the format does not show: no caller lookup (a walk up the stack),
    no thread or process names (the optimisations of the logging HOWTO)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # One "HTTP Request: POST ..." line per run is noise beside the lifecycle lines.
    for name in ("httpx2", "httpcore2"):
        logging.getLogger(name).setLevel(logging.WARNING)


async def _check_redis(url: str) -> None:
    async with open_redis_store(url):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """The ``tokenrelay`` command."""
    args = _parser().parse_args(argv)
    try:
        config = _config(args)
        config.check()
        if config.db != ":memory:":
            SQLiteStore(config.db).check()  # a file it cannot use is one line, before serving
        if config.redis is not None:
            trio.run(_check_redis, config.redis)  # likewise, a Redis it cannot reach
    except (ValueError, StoreUnavailable) as exc:
        print(f"tokenrelay: {exc}", file=sys.stderr)
        return 2
    _configure_logging()
    if args.api_keys:
        logger.warning(
            "api_key_on_command_line: any user of this machine can read it in 'ps'; "
            "prefer --api-keys-file or TOKENRELAY_API_KEY"
        )
    try:
        if config.workers > 1:
            return trio.run(supervise, config, list(sys.argv[2:] if argv is None else argv[1:]))
        else:
            trio.run(partial(serve, config, tune_gc=True))
    except CannotListen as exc:
        print(f"tokenrelay: {exc}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:
        cannot, rest = group.split((CannotListen, LifespanFailureError))
        if cannot is None or rest is not None:
            raise
        error = leaves(cannot)[0]
        # A store that failed while the app started (Redis lost since the check above).
        print(f"tokenrelay: {error}", file=sys.stderr)
        return 2
    return 0
