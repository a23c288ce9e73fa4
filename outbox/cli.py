"""The ``outbox`` command line (also ``python -m outbox``).

One subcommand per job, each a ``_add_<name>(subparsers)`` function that registers its
arguments and the function that runs it; ``main`` only parses and dispatches. To add a
command, write ``_add_stats`` and ``_stats`` alongside ``serve`` and list it in
``_COMMANDS``.

``serve`` runs a :class:`~outbox.receiver.Receiver` that stores every message in its inbox
and does nothing else: a durable landing point for an Outbox, a test target, or the base of
a deployment that reads the ``inbox`` table. It prints the URL it listens on as the only
line on stdout (logs go to stderr), so a script can read it.

The operator commands, ``stats``, ``list``, ``requeue`` and ``purge``, work on a file while an
Outbox or a receiver runs on it (short transactions, a busy timeout; see ``operate.py``,
which does the SQL). Each prints a table by default and JSON with ``--json``; each exits 0
when done, 1 when the file cannot be used for it, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import sqlite3
import ssl
import sys
import time
from collections.abc import Callable

from . import operate
from .client.lease import holder
from .errors import StoreError
from .receiver import DEFAULT_MAX_SIZE, ConnectRequest, Receiver, serve
from .receiver.api import Authenticate
from .relay import add_relay

Command = Callable[[argparse.Namespace], int]

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _common() -> argparse.ArgumentParser:
    """Options every subcommand also takes after its name (``outbox stats --log-level X``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,  # absent here: keep the value given before the command
        type=str.upper,
        choices=_LOG_LEVELS,
        help="log level for stderr (default: INFO)",
    )
    return common


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("outbox")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _add_serve(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve",
        parents=[_common()],
        help="receive messages into a SQLite or PostgreSQL inbox",
        description="Run a receiver: every message is stored once in the inbox table of "
        "--db and acked after it is committed. Stops cleanly on Ctrl-C or SIGTERM.",
    )
    parser.add_argument(
        "--db",
        required=True,
        help="SQLite inbox file (created if missing), or a postgresql:// URL (needs "
        "outbox[postgres]; several receivers may share one database)",
    )
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
        "(default: %(default)s; SQLite only, refused with a postgresql:// --db)",
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
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on http://HOST:PORT/metrics (needs outbox[metrics]; "
        "0 picks a free port, printed on the second line)",
    )
    parser.set_defaults(run=_serve)


def _add_file_options(parser: argparse.ArgumentParser, kinds: str) -> None:
    parser.add_argument("--db", required=True, help=f"SQLite file: {kinds}")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_stats(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "stats",
        parents=[_common()],
        help="what an outbox or inbox file holds (read-only; safe while the app runs)",
        description="For an outbox: counts by status, the oldest pending message and the "
        "newest dead rows with their reasons. For an inbox: rows, rejected rows, clients, and "
        "the latest per client. Opens the file read-only. --watch refreshes the counts with "
        "rates until Ctrl-C.",
    )
    _add_file_options(parser, "an outbox or an inbox")
    parser.add_argument(
        "--dead", type=int, default=10, help="how many dead rows to list (default: %(default)s)"
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=10,
        help="inbox: how many clients to list, latest first (default: %(default)s)",
    )
    parser.add_argument(
        "--watch", action="store_true", help="print counts and rates every --interval seconds"
    )
    parser.add_argument(
        "--interval",
        type=_positive_seconds,
        default=1.0,
        help="seconds between two --watch lines (default: %(default)s)",
    )
    parser.add_argument(
        "--count", type=int, default=None, help="--watch: stop after this many lines"
    )
    parser.set_defaults(run=_stats)


def _add_list(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "list",
        parents=[_common()],
        help="rows of an outbox (oldest first) or an inbox (latest first); read-only",
        description="Outbox rows with id, status, attempts, age, last error and a payload "
        "preview, in the order they are sent; or inbox rows, the latest first. Read-only.",
    )
    _add_file_options(parser, "an outbox or an inbox")
    statuses = (*operate.OUTBOX_STATUSES, *operate.INBOX_STATUSES)
    parser.add_argument(
        "--status",
        choices=statuses,
        help="only rows with this status: pending, acked, dead or expired (outbox); handled or "
        "rejected (inbox)",
    )
    parser.add_argument(
        "--limit", type=int, default=50, help="most rows to show (default: %(default)s)"
    )
    parser.add_argument(
        "--width",
        type=int,
        default=operate.PREVIEW,
        help="characters of payload and error shown (default: %(default)s)",
    )
    parser.set_defaults(run=_list)


def _add_requeue(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "requeue",
        parents=[_common()],
        help="put dead outbox rows back to pending (safe while the app runs)",
        description="Dead rows go back to pending with their attempts reset; the sender "
        "sends them again. Give the ids, or --dead for every dead row. Rows that are not "
        "dead are left as they are and listed.",
    )
    _add_file_options(parser, "an outbox")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int, nargs="+", metavar="N", help="these dead rows")
    which.add_argument("--dead", action="store_true", help="every dead row")
    which.add_argument(
        "--expired", action="store_true", help="every expired row (it comes back with no ttl)"
    )
    parser.add_argument(
        "--busy-timeout",
        type=_positive_seconds,
        default=5.0,
        help="seconds to wait for the running app's write lock (default: %(default)s)",
    )
    parser.set_defaults(run=_requeue)


def _add_purge(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "purge",
        parents=[_common()],
        help="delete acked or dead outbox rows (ids are never reused)",
        description="Deletes acked rows (--acked, optionally only those acked more than "
        "--older-than ago) or dead rows (--dead, --older-than required: dead rows are the "
        "record of what was never delivered) in chunks of 5,000 per transaction, so the "
        "running sender never waits long. Ids are never given out again.",
    )
    _add_file_options(parser, "an outbox")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--acked", action="store_true", help="delete acked rows")
    which.add_argument("--dead", action="store_true", help="delete dead rows")
    parser.add_argument(
        "--older-than",
        type=_duration,
        metavar="DURATION",
        help="only rows whose status changed longer ago than this: 90s, 15m, 2h, 7d",
    )
    parser.add_argument(
        "--busy-timeout",
        type=_positive_seconds,
        default=5.0,
        help="seconds to wait for the running app's write lock (default: %(default)s)",
    )
    parser.set_defaults(run=_purge)


def _duration(text: str) -> float:
    try:
        return operate.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _add_relay(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_relay(subparsers, parents=[_common()])  # the command lives in relay.py


_COMMANDS = (_add_serve, _add_stats, _add_list, _add_requeue, _add_purge, _add_relay)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbox", description="WebSocket sending as safe as writing to a database."
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=_LOG_LEVELS,
        help="log level for stderr (default: %(default)s); also accepted after the command",
    )
    parser.add_argument("--version", action="version", version=f"outbox {_version()}")
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
    try:
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
    except (ValueError, TypeError) as exc:  # checked at construction: names the option
        print(f"outbox serve: {exc}", file=sys.stderr)
        return 2
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        print(f"outbox serve: --metrics-port {args.metrics_port} is not a port", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve_until_stopped(receiver, args.host, args.metrics_port))
    except KeyboardInterrupt:  # platforms without add_signal_handler (Windows)
        return 0
    except (StoreError, OSError) as exc:
        print(f"outbox serve: {exc}", file=sys.stderr)
        return 1


async def _serve_until_stopped(
    receiver: Receiver, host: str = "127.0.0.1", metrics_port: int | None = None
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Windows has no add_signal_handler; Ctrl-C then raises KeyboardInterrupt (see _serve).
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    async with receiver:
        print(receiver.url, flush=True)
        with contextlib.ExitStack() as cleanup:
            if metrics_port is not None:
                from . import metrics  # the optional extra: imported only when asked for

                try:
                    url, stop_metrics = metrics.serve_receiver_metrics(receiver, host, metrics_port)
                except metrics.MetricsUnavailableError as exc:
                    print(f"outbox serve: {exc}", file=sys.stderr)
                    return 2
                cleanup.callback(stop_metrics)
                print(f"metrics: {url}", flush=True)
            await stop.wait()
            logging.getLogger("outbox.receiver").info("stopping (signal received)")
    return 0


def _fail(command: str, exc: Exception) -> int:
    print(f"outbox {command}: {exc}", file=sys.stderr)
    return 1


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=None, separators=(", ", ": ")), flush=True)


def _table(headers: tuple[str, ...], rows: list[tuple[object, ...]]) -> None:
    """Columns as wide as their widest cell, the last one left ragged."""
    cells = [tuple("-" if v is None else str(v) for v in row) for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    for row in (headers, *cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _stats(args: argparse.Namespace) -> int:
    try:
        with operate.open_file(args.db, write=False) as conn:
            kind = operate.kind_of(conn, args.db)
            if args.watch:
                return _watch(conn, kind, args)
            stats: operate.OutboxStats | operate.InboxStats = (
                operate.outbox_stats(conn, args.db, args.dead)
                if kind == "outbox"
                else operate.inbox_stats(conn, args.db, args.clients)
            )
    except operate.OperateError as exc:
        return _fail("stats", exc)
    if args.json:
        _print_json(operate.as_dict(stats))
    elif isinstance(stats, operate.OutboxStats):
        _print_outbox_stats(stats)
    else:
        _print_inbox_stats(stats)
    return 0


def _print_outbox_stats(stats: operate.OutboxStats) -> None:
    print(f"outbox     {stats.path}")
    print(f"client id  {stats.client_id or '-'}")
    held, pid = holder(stats.path)  # a try-lock, released at once: the sender is undisturbed
    print(f"sender     {'active' + (f' (pid {pid})' if pid else '') if held else 'none'}")
    for status in ("pending", "acked", "dead", "expired"):
        print(f"{status:<10} {getattr(stats, status)}")
    if stats.oldest_pending_id is not None and stats.oldest_pending_age is not None:
        age = operate.format_age(stats.oldest_pending_age)
        print(f"oldest pending: id {stats.oldest_pending_id}, waiting {age}")
    for row in stats.dead_rows:
        print(f"dead {row['id']} after {row['attempts']} attempt(s): {row['last_error']}")


def _print_inbox_stats(stats: operate.InboxStats) -> None:
    print(f"inbox      {stats.path}")
    print(f"rows       {stats.rows}")
    print(f"rejected   {stats.rejected}")
    print(f"clients    {stats.clients}")
    print(f"retention  {stats.retention}")
    if stats.latest:
        print()
        _table(
            ("client", "rows", "max id", "last seen"),
            [
                (
                    operate.preview(c["client_id"]),
                    c["rows"],
                    c["max_message_id"],
                    operate.format_age(c["last_received_age"]) + " ago",
                )
                for c in stats.latest
            ],
        )


def _watch(conn: sqlite3.Connection, kind: operate.Kind, args: argparse.Namespace) -> int:
    """A line of counts every --interval seconds, with rates since the line before."""
    previous: tuple[float, int, int] | None = None  # monotonic time, done, made
    lines = 0
    if not args.json:
        print(
            "time      pending    acked     dead   acked/s  enqueued/s  oldest pending"
            if kind == "outbox"
            else "time         rows  rejected  clients    rows/s",
            flush=True,
        )
    try:
        while args.count is None or lines < args.count:
            now = time.monotonic()  # rates over the real interval, whatever the wall clock
            clock = time.strftime("%H:%M:%S")
            row: dict[str, object]
            if kind == "outbox":
                s = operate.outbox_stats(conn, args.db, 0)
                # acked in the file's life, purged too
                done = s.max_id - s.pending - s.dead - s.expired
                made = s.max_id
                acked_rate, made_rate = _rates(previous, now, done, made)
                row = {
                    "time": clock,
                    "pending": s.pending,
                    "acked": s.acked,
                    "dead": s.dead,
                    "acked_per_second": acked_rate,
                    "enqueued_per_second": made_rate,
                    "oldest_pending_age": s.oldest_pending_age,
                }
                oldest = (
                    "-"
                    if s.oldest_pending_age is None
                    else operate.format_age(s.oldest_pending_age)
                )
                text = (
                    f"{clock}  {s.pending:>7}  {s.acked:>7}  {s.dead:>7}  "
                    f"{_rate(acked_rate):>8}  {_rate(made_rate):>10}  {oldest}"
                )
            else:
                i = operate.inbox_stats(conn, args.db, 0)
                done = made = i.rows
                rows_rate, _ = _rates(previous, now, done, made)
                row = {
                    "time": clock,
                    "rows": i.rows,
                    "rejected": i.rejected,
                    "clients": i.clients,
                    "rows_per_second": rows_rate,
                }
                text = (
                    f"{clock}  {i.rows:>7}  {i.rejected:>8}  {i.clients:>7}  {_rate(rows_rate):>8}"
                )
            if args.json:
                _print_json(row)
            else:
                print(text, flush=True)
            previous = (now, done, made)
            lines += 1
            if args.count is None or lines < args.count:
                time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    return 0


def _rates(
    previous: tuple[float, int, int] | None, now: float, done: int, made: int
) -> tuple[float | None, float | None]:
    """Per second since ``previous``; None on the first line."""
    if previous is None or now <= previous[0]:
        return None, None
    elapsed = now - previous[0]
    return round((done - previous[1]) / elapsed, 1), round((made - previous[2]) / elapsed, 1)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _list(args: argparse.Namespace) -> int:
    try:
        with operate.open_file(args.db, write=False) as conn:
            kind = operate.kind_of(conn, args.db)
            lister = operate.list_outbox if kind == "outbox" else operate.list_inbox
            rows = lister(conn, args.status, args.limit, args.width)
    except operate.OperateError as exc:
        return _fail("list", exc)
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print(f"no {args.status + ' ' if args.status else ''}rows in {kind} {args.db}")
        return 0
    for row in rows:
        row["age"] = operate.format_age(float(row["age"]))
    if kind == "outbox":
        headers = ("id", "status", "attempts", "age", "last_error", "payload")
    else:
        headers = ("client_id", "message_id", "status", "age", "reject_reason", "payload")
    _table(headers, [tuple(row[h] for h in headers) for row in rows])
    return 0


def _requeue(args: argparse.Namespace) -> int:
    try:
        with operate.open_file(args.db, write=True, busy_timeout=args.busy_timeout) as conn:
            kind = operate.kind_of(conn, args.db)
            operate.require(kind, "outbox", args.db, "requeue works on an outbox's dead rows")
            ids = None if args.dead or args.expired else args.id
            result = operate.requeue(conn, ids, expired=args.expired)
    except operate.OperateError as exc:
        return _fail("requeue", exc)
    if args.json:
        _print_json({"requeued": result.requeued, "skipped": result.skipped})
        return 0
    shown = ", ".join(str(n) for n in result.requeued[:20])
    more = f" and {len(result.requeued) - 20} more" if len(result.requeued) > 20 else ""
    print(
        f"requeued {len(result.requeued)} dead row(s) to pending"
        + (f": {shown}{more}" if result.requeued else "")
    )
    for n, status in result.skipped.items():
        print(f"left {n} as it is: it is {status}, not dead")
    return 0


def _purge(args: argparse.Namespace) -> int:
    if args.dead and args.older_than is None:
        print(
            "outbox purge: --dead needs --older-than DURATION (e.g. 7d): dead rows are the "
            "record of what was never delivered",
            file=sys.stderr,
        )
        return 2
    status = "dead" if args.dead else "acked"
    try:
        with operate.open_file(args.db, write=True, busy_timeout=args.busy_timeout) as conn:
            kind = operate.kind_of(conn, args.db)
            operate.require(
                kind,
                "outbox",
                args.db,
                "inbox rows are the deduplication record (deleting one lets a resend of that "
                "message be handled again), so they are not purged",
            )
            deleted = operate.purge(conn, status, args.older_than)
    except operate.OperateError as exc:
        return _fail("purge", exc)
    if args.json:
        _print_json({"deleted": deleted, "status": status, "older_than": args.older_than})
    else:
        age = "" if args.older_than is None else f" older than {args.older_than:g}s"
        print(f"deleted {deleted} {status} row(s){age}")
    return 0
