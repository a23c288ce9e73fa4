"""The ``outbox`` command line (also ``python -m outbox``).

One subcommand per job, each a ``_add_<name>(subparsers)`` function that registers its
arguments and the function that runs it; ``main`` only parses and dispatches. To add a
command, write ``_add_stats`` and ``_stats`` alongside ``serve`` and list it in
``_COMMANDS``.

``serve`` runs a :class:`~outbox.receiver.Receiver` that stores every message in its inbox
and does nothing else: a durable landing point for an Outbox, a test target, or the base of
a deployment that reads the ``inbox`` table. It prints the URL it listens on as the only
line on stdout (logs go to stderr), so a script can read it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sqlite3
import ssl
import sys
import time
import urllib.parse
from collections.abc import Callable

from .client.lease import holder
from .errors import StoreError
from .receiver import DEFAULT_MAX_SIZE, ConnectRequest, Receiver, serve
from .receiver.api import Authenticate
from .relay import add_relay

Command = Callable[[argparse.Namespace], int]


def _add_serve(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="receive messages into a SQLite inbox",
        description="Run a receiver: every message is stored once in the inbox table of "
        "--db and acked after it is committed. Stops cleanly on Ctrl-C or SIGTERM.",
    )
    parser.add_argument("--db", required=True, help="SQLite inbox file (created if missing)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8765, help="TCP port; 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument(
        "--synchronous",
        choices=("OFF", "NORMAL", "FULL", "EXTRA"),
        default="FULL",
        type=str.upper,
        help="SQLite durability: FULL survives power loss, NORMAL a process crash "
        "(default: %(default)s)",
    )
    parser.add_argument("--certfile", help="PEM certificate (chain) to serve wss:// with")
    parser.add_argument("--keyfile", help="PEM private key for --certfile, if separate")
    parser.add_argument(
        "--max-size",
        type=int,
        default=None,
        help="largest frame in bytes; larger ones close the connection with 1009",
    )
    parser.add_argument(
        "--token-file",
        help="require 'Authorization: Bearer TOKEN': one 'TOKEN PRINCIPAL' per line (# comments "
        "and blank lines ignored); without it, claimed client ids are trusted",
    )
    parser.set_defaults(run=_serve)


def _add_stats(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "stats",
        help="show what an outbox file holds (read-only; safe while the app runs)",
        description="Counts by status, the oldest pending message, and the newest dead "
        "rows with their reasons. Opens the file read-only.",
    )
    parser.add_argument("--db", required=True, help="SQLite outbox file")
    parser.add_argument(
        "--dead", type=int, default=10, help="how many dead rows to list (default: %(default)s)"
    )
    parser.set_defaults(run=_stats)


_COMMANDS = (_add_serve, _add_stats, add_relay)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbox", description="WebSocket sending as safe as writing to a database."
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level for stderr (default: %(default)s)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    run: Command = args.run
    return run(args)


class TokenFileError(ValueError):
    """A token file that cannot be read as ``TOKEN PRINCIPAL`` lines."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def read_token_file(path: str) -> dict[bytes, str]:
    """SHA-256 of each token -> its principal. Raises TokenFileError naming the bad line.

    Lookups go by the token's digest, so the time a lookup takes says nothing about how
    much of a guessed token was right.
    """
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read token file {path}: {exc}") from None
    tokens: dict[bytes, str] = {}
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split()
        if len(fields) != 2:
            raise TokenFileError(
                f"{path} line {number}: expected 'TOKEN PRINCIPAL' (two fields separated by "
                f"spaces), got {len(fields)} field(s)"
            )
        token, principal = fields
        if _digest(token) in tokens:
            raise TokenFileError(f"{path} line {number}: this token is already listed above")
        tokens[_digest(token)] = principal
    if not tokens:
        raise TokenFileError(f"{path} lists no tokens: every client would be refused")
    return tokens


def bearer_authenticate(tokens: dict[bytes, str]) -> Authenticate:
    """An ``authenticate`` hook: the principal of the ``Authorization: Bearer`` token, or
    None (401) for a missing, repeated or unknown one."""

    def authenticate(request: ConnectRequest) -> str | None:
        values = request.headers.get_all("Authorization")
        if len(values) != 1:
            return None
        scheme, _, token = values[0].strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return tokens.get(_digest(token.strip()))

    return authenticate


def _serve(args: argparse.Namespace) -> int:
    authenticate = None
    if args.token_file:
        try:
            authenticate = bearer_authenticate(read_token_file(args.token_file))
        except TokenFileError as exc:
            print(f"outbox serve: {exc}", file=sys.stderr)
            return 2
    context = None
    if args.certfile:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.certfile, args.keyfile)
    receiver = serve(
        None,
        args.db,
        host=args.host,
        port=args.port,
        ssl=context,
        authenticate=authenticate,
        synchronous=args.synchronous,
        max_size=args.max_size or DEFAULT_MAX_SIZE,
    )
    try:
        return asyncio.run(_serve_until_stopped(receiver))
    except KeyboardInterrupt:  # platforms without add_signal_handler (Windows)
        return 0
    except (StoreError, OSError) as exc:
        print(f"outbox serve: {exc}", file=sys.stderr)
        return 1


async def _serve_until_stopped(receiver: Receiver) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Windows has no add_signal_handler; Ctrl-C then raises KeyboardInterrupt (see _serve).
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    async with receiver:
        print(receiver.url, flush=True)
        await stop.wait()
        logging.getLogger("outbox.receiver").info("stopping (signal received)")
    return 0


def _stats(args: argparse.Namespace) -> int:
    if not os.path.exists(args.db):
        print(f"outbox stats: no such file {args.db}", file=sys.stderr)
        return 1
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{urllib.parse.quote(args.db)}?mode=ro", uri=True)
        ) as conn:
            counts = dict(conn.execute("SELECT status, count(*) FROM outbox GROUP BY status"))
            oldest = conn.execute(
                "SELECT id, created_at FROM outbox WHERE status = 'pending' ORDER BY id LIMIT 1"
            ).fetchone()
            client = conn.execute(
                "SELECT value FROM outbox_meta WHERE name = 'client_id'"
            ).fetchone()
            dead = conn.execute(
                "SELECT id, attempts, last_error FROM outbox WHERE status = 'dead' "
                "ORDER BY id DESC LIMIT ?",
                (args.dead,),
            ).fetchall()
    except sqlite3.Error as exc:
        print(f"outbox stats: cannot read {args.db} as an outbox: {exc}", file=sys.stderr)
        return 1
    print(f"client id  {client[0] if client else '-'}")
    held, pid = holder(args.db)  # a try-lock, released at once: the sender is undisturbed
    print(f"sender     {'active' + (f' (pid {pid})' if pid else '') if held else 'none'}")
    for status in ("pending", "acked", "dead"):
        print(f"{status:<10} {counts.get(status, 0)}")
    if oldest:
        age = time.time() - oldest[1]
        print(f"oldest pending: id {oldest[0]}, waiting {age:.1f}s")
    for message_id, attempts, error in dead:
        print(f"dead {message_id} after {attempts} attempt(s): {error}")
    return 0
