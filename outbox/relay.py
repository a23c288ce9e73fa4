"""``outbox relay``: the sender for an existing database, as a process of its own.

    python -m outbox relay --db app.db --url ws://host/path [--ack-timeout 5 ...]

The application writes rows (``outbox.enqueue`` in its own transactions, ``Producer``, or
``Outbox.send``); the relay runs an ``Outbox`` on the file and sends them. Every ``Outbox``
option is a flag, generated from the ``Options`` dataclass: ``ack_timeout`` is
``--ack-timeout``, a boolean such as ``batch`` is ``--batch`` / ``--no-batch``, an option that
may be None takes ``none``, ``additional_headers`` is ``--header 'Name: value'`` (repeatable)
and ``ssl`` is ``--ssl-cafile PATH``.

Two relays (or a relay and an application's ``Outbox``) on one file share it through the
sender lease (``client/lease.py``): one sends, the other waits as a standby and takes over
if the first one dies. The relay prints ``role active`` / ``role standby`` on stdout when its
role changes, and logs progress to stderr every ``--progress-interval`` seconds.

On SIGINT or SIGTERM it stops sending new rows, waits up to ``--stop-timeout`` seconds for
the acks of what is in flight, then closes (committing the acks it read). Nothing is lost
either way: an un-acked row stays pending and is sent again by the next sender.
Exit codes: 0 after a signal, 1 for a database that is missing or unusable, 2 for bad flags.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import signal
import ssl
import sys
import time
import typing
from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import Any

from .client import Outbox
from .client import options as options_module
from .client.options import Options
from .errors import StoreError

logger = logging.getLogger("outbox.relay")

_TICK = 0.25  # seconds between two looks at the role


def _docstrings() -> dict[str, str]:
    """Each Options field's docstring (the string under it in options.py), for --help."""
    found: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(options_module))
    except (OSError, TypeError):
        return found
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Options":
            body = node.body
            for first, second in itertools.pairwise(body):
                if (
                    isinstance(first, ast.AnnAssign)
                    and isinstance(first.target, ast.Name)
                    and isinstance(second, ast.Expr)
                    and isinstance(second.value, ast.Constant)
                    and isinstance(second.value.value, str)
                ):
                    found[first.target.id] = " ".join(second.value.value.split())
    return found


def _optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``Options`` field, typed from its annotation, default from the field."""
    hints = typing.get_type_hints(Options, vars(options_module), vars(options_module))
    docs = _docstrings()
    group = parser.add_argument_group("Outbox options (see the README's Options table)")
    for field in fields(Options):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not MISSING else None
        text = docs.get(field.name, "")
        hint = hints[field.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        inner = [a for a in args if a is not type(None)]
        base = inner[0] if optional and len(inner) == 1 else hint
        if field.name == "additional_headers":
            group.add_argument(
                "--header", dest=field.name, action="append", type=_header, metavar="'NAME: VALUE'",
                help=text,
            )  # fmt: skip
        elif field.name == "ssl":
            group.add_argument(
                "--ssl-cafile", dest=field.name, metavar="PATH",
                help="CA bundle to verify a wss:// server with (default: the system's)",
            )  # fmt: skip
        elif base is bool:
            group.add_argument(
                flag, dest=field.name, action=argparse.BooleanOptionalAction, default=default,
                help=f"{text} (default: {default})",
            )  # fmt: skip
        elif typing.get_origin(base) is typing.Literal:
            choices = typing.get_args(base)
            upper = all(isinstance(c, str) and c.isupper() for c in choices)
            group.add_argument(
                flag, dest=field.name, choices=choices, default=default,
                type=str.upper if upper else str, help=f"{text} (default: {default})",
            )  # fmt: skip
        elif base in (int, float):
            group.add_argument(
                flag, dest=field.name, default=default,
                type=_optional(base) if optional else base,
                metavar=base.__name__.upper() + ("|none" if optional else ""),
                help=f"{text} (default: {default})",
            )  # fmt: skip
        else:  # a new kind of option: fail loudly here rather than silently miss a flag
            raise TypeError(f"relay: no flag for option {field.name} of type {hint!r}")


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Outbox`` keyword arguments the flags give (those left at the default too)."""
    options: dict[str, Any] = {}
    for field in fields(Options):
        value = getattr(args, field.name)
        if field.name == "additional_headers":
            value = dict(value) if value else None
        elif field.name == "ssl":
            value = ssl.create_default_context(cafile=value) if value else None
        options[field.name] = value
    return options


def add_relay(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: Sequence[argparse.ArgumentParser] = (),
) -> None:
    parser = subparsers.add_parser(
        "relay",
        parents=list(parents),
        help="send the pending rows of an existing database to a receiver",
        description="Run the sender for --db: every row that any process commits to its "
        "outbox table goes to --url until acked. One relay per file is active; others wait "
        "as standbys. Stops cleanly on Ctrl-C or SIGTERM.",
    )
    parser.add_argument("--db", required=True, help="SQLite database (must exist)")
    parser.add_argument("--url", required=True, help="ws:// or wss:// URL of the receiver")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics (needs "
        "outbox[metrics]; 0 picks a free port, printed on stdout)",
    )
    parser.add_argument(
        "--progress-interval",
        type=float,
        default=10.0,
        help="seconds between progress lines on stderr (default: %(default)s)",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=5.0,
        help="on a signal, seconds to wait for the acks of what is in flight "
        "(default: %(default)s)",
    )
    add_option_flags(parser)
    parser.set_defaults(run=run_relay)


def run_relay(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.db):
        print(
            f"outbox relay: no such database {args.db}; the relay sends from an existing file "
            "and does not create one (outbox.migrate(path) or an Outbox creates it)",
            file=sys.stderr,
        )
        return 1
    try:
        box = Outbox(args.db, args.url, **options_from_args(args))
    except (ValueError, TypeError, OSError) as exc:
        print(f"outbox relay: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_relay(box, args))
    except KeyboardInterrupt:  # platforms without add_signal_handler (Windows)
        return 0
    except (StoreError, OSError) as exc:
        print(f"outbox relay: {exc}", file=sys.stderr)
        return 1


async def _relay(box: Outbox, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    async with box, contextlib.AsyncExitStack() as cleanup:
        if args.metrics_port is not None:
            from . import metrics  # the optional extra: imported only when asked for

            try:
                url, stop_metrics = metrics.serve_receiver_metrics(
                    box, "127.0.0.1", args.metrics_port
                )
            except metrics.MetricsUnavailableError as exc:
                print(f"outbox relay: {exc}", file=sys.stderr)
                return 2
            cleanup.callback(stop_metrics)
            print(f"metrics: {url}", flush=True)
        logger.info("relay %s -> %s started", box.path, box.url)
        role = None
        next_progress = time.monotonic() + args.progress_interval
        while not stop.is_set():
            if box.stats().role != role:
                role = box.stats().role
                print("role", role, flush=True)
                logger.info("relay %s: %s", box.path, role)
            if time.monotonic() >= next_progress:
                next_progress += args.progress_interval
                _log_progress(box)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_TICK):
                    await stop.wait()
        logger.info("relay stopping (signal received): waiting for in-flight acks")
        deadline = time.monotonic() + args.stop_timeout
        for _ in range(max(1, int(args.stop_timeout / 0.01))):
            if not len(box.window) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.01)
        _log_progress(box)
    return 0


def _log_progress(box: Outbox) -> None:
    stats = box.stats()
    logger.info(
        "relay %s: %s, %s; pending %d, in flight %d, sent %d, acked %d, dead %d",
        box.path,
        stats.role,
        stats.state,
        stats.pending,
        stats.in_flight,
        stats.counters.messages_sent,
        stats.counters.acks,
        stats.dead,
    )
