"""The sending side: ``Outbox`` and the parts behind it.

- ``outbox``: the ``Outbox`` an application embeds (send, wait, drain, stats).
- ``options``: every tunable, validated at construction.
- ``producer``: ``Producer``, a thread-safe synchronous writer (group commit, no sending).
- ``store``: the outbox table: the queue's state, its group-commit loop, its reads.
- ``commit``: what the writer thread runs: typed writes applied in one transaction.
- ``file_guard``: whether the path still names our file, and the -wal's size.
- ``retention``: how old acked rows are by the monotonic clock (pure).
- ``supervisor``: connect, back off, reconnect; the connection ``State``.
- ``session``: one connection's life: stream rows out, read acks in.
- ``heartbeat``: the ping loop over a live connection.
- ``stats``: what an Outbox reports about itself.
"""

from __future__ import annotations

from .options import Options
from .outbox import Outbox
from .producer import Producer
from .stats import Stats
from .supervisor import State

__all__ = ["Options", "Outbox", "Producer", "State", "Stats"]
