"""``python -m outbox``: the same as the ``outbox`` command (see outbox/cli.py)."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
