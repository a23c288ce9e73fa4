"""``outbox relay`` as a child process: ``python tests/procs/relay.py --db DB --url URL ...``
is ``python -m outbox relay --db DB --url URL ...`` (same code, a path ``Proc`` can start)."""

from __future__ import annotations

import sys

from outbox.cli import main

if __name__ == "__main__":
    sys.exit(main(["relay", *sys.argv[1:]]))
