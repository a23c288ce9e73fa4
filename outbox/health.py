"""``outbox health URL``: ask a receiver's health endpoint whether it takes connections.

A receiver answers a plain HTTP ``GET`` on its ``health_path`` (``/healthz`` by default)
with 200 "ready" while it serves and 503 "draining" from the moment ``close()`` (or SIGTERM)
starts its drain; before it listens and after it closed, nothing answers. This module is the
probe, for orchestrators that run a command rather than an HTTP check (a Docker
``HEALTHCHECK``, a Kubernetes ``exec`` probe): exit status 0 ready, 1 anything else.

Standard library only (``urllib``), synchronous: it runs once and exits.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_PATH", "Health", "add_health", "health_url", "probe"]

DEFAULT_PATH = "/healthz"
"""The receiver's default ``health_path``."""

_SCHEMES = {"ws": "http", "wss": "https", "http": "http", "https": "https"}


@dataclass(frozen=True, slots=True)
class Health:
    """What a probe found: ``status`` None when nothing answered (``detail`` says why)."""

    status: int | None
    detail: str

    @property
    def ready(self) -> bool:
        return self.status == 200


def health_url(url: str, path: str = DEFAULT_PATH) -> str:
    """The probe's ``http(s)://`` URL for a receiver URL: ``ws://`` becomes ``http://``,
    ``wss://`` ``https://``; a URL with no path (or ``/``, where clients connect) gets
    ``path``. Raises ValueError for anything that is not such a URL."""
    split = urllib.parse.urlsplit(url)
    scheme = _SCHEMES.get(split.scheme.lower())
    if scheme is None or not split.hostname:
        raise ValueError(
            f"not a receiver URL: {url!r}; give ws://HOST:PORT/ (the health path is added) "
            "or http://HOST:PORT/healthz"
        )
    target = split.path if split.path not in ("", "/") else path
    return urllib.parse.urlunsplit((scheme, split.netloc, target, split.query, ""))


def probe(url: str, *, timeout: float = 5.0, context: ssl.SSLContext | None = None) -> Health:
    """GET the health endpoint once; never raises for what the network or server did."""
    # No proxies from the environment: a probe is for this receiver, not a proxy's answer.
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as response:
            return Health(response.status, _first_line(response.read(200)))
    except urllib.error.HTTPError as exc:  # 503 draining, 404 no such path...
        with exc:
            return Health(exc.code, _first_line(exc.read(200)) or str(exc.reason))
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Health(None, f"cannot reach {url}: {reason}")


def _first_line(body: bytes) -> str:
    lines = body.decode("utf-8", "replace").strip().splitlines()
    return lines[0][:200] if lines else ""


def add_health(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: Sequence[argparse.ArgumentParser] = (),
) -> None:
    parser = subparsers.add_parser(
        "health",
        parents=list(parents),
        help="probe a receiver's health endpoint (exit 0 ready, 1 not)",
        description="GET the health endpoint of a running receiver and print its state: "
        "'ready' (exit 0), 'draining' or unreachable (exit 1). A ws:// URL without a path "
        f"gets --path ({DEFAULT_PATH}).",
    )
    parser.add_argument("url", help="ws://HOST:PORT/ or http://HOST:PORT/healthz")
    parser.add_argument(
        "--path",
        default=DEFAULT_PATH,
        help="health path added to a URL without one (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds to wait for the answer (default: %(default)s)",
    )
    parser.add_argument(
        "--cafile", help="PEM file of the CA that signed the receiver's certificate (wss://)"
    )
    parser.set_defaults(run=run_health)


def run_health(args: argparse.Namespace) -> int:
    try:
        url = health_url(args.url, args.path)
    except ValueError as exc:
        print(f"outbox health: {exc}", file=sys.stderr)
        return 2
    if not args.timeout > 0:
        print(f"outbox health: --timeout must be positive, got {args.timeout}", file=sys.stderr)
        return 2
    context = None
    if args.cafile:
        try:
            context = ssl.create_default_context(cafile=args.cafile)
        except (OSError, ssl.SSLError) as exc:
            print(f"outbox health: cannot use --cafile {args.cafile}: {exc}", file=sys.stderr)
            return 2
    health = probe(url, timeout=args.timeout, context=context)
    if health.status is None:
        print(f"unreachable: {health.detail}")
    else:
        print(f"{health.detail or 'no answer body'} (HTTP {health.status})")
    return 0 if health.ready else 1
