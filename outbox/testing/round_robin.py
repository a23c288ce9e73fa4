"""A round-robin TCP proxy: one listening port in front of a fleet of servers.

A fleet of receivers behind a load balancer with no sticky sessions is what a client's
reconnect meets in production: the next connection lands on whichever instance is next,
and an instance that dies takes its connections with it. This proxy is that balancer, on
loopback, for tests and benchmarks:

- each new connection goes to the next upstream in turn that accepts the TCP connection; one
  that refuses (its process is dead, or it was :meth:`~RoundRobinProxy.remove`\\ d) is
  skipped, and the client is reset only when none accepts;
- :meth:`~RoundRobinProxy.kill_upstream` resets every connection to one upstream at once (a
  killed instance: the kernel would close them too, this makes it immediate and counted);
- :meth:`~RoundRobinProxy.replace` points one slot at a restarted instance's new port;
- :meth:`~RoundRobinProxy.partition` silences one upstream's connections without closing
  them: the client times out and moves on while the instance keeps its stale half-open end.

It is a :class:`~outbox.testing.fault_proxy.FaultProxy` that picks its upstream per
connection, so every fault of that proxy (cuts, delay, blackhole, refuse, chaos) works here
too, across all upstreams. Only loopback addresses are accepted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence

from .fault_proxy import Fault, FaultPlan, FaultProxy, _Link, _loopback

__all__ = ["RoundRobinProxy"]

logger = logging.getLogger(__name__)


class RoundRobinProxy(FaultProxy):
    """A :class:`FaultProxy` over ``upstreams`` (``(host, port)`` pairs), in turn.

    Usage::

        async with RoundRobinProxy([("127.0.0.1", a), ("127.0.0.1", b)]) as proxy:
            box = Outbox(path, proxy.url())
            ...
            proxy.kill_upstream(0)          # instance 0 died: its clients reconnect elsewhere
            proxy.replace(0, "127.0.0.1", c)  # ... and came back on port c

    ``connections_to[i]`` counts the connections handed to upstream ``i`` over the proxy's
    life. Every method is to be called from the event loop's thread.
    """

    def __init__(
        self,
        upstreams: Sequence[tuple[str, int]],
        *,
        seed: int | None = None,
        plan: FaultPlan | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        if not upstreams:
            raise ValueError("a RoundRobinProxy needs at least one upstream (host, port)")
        checked: list[tuple[str, int] | None] = [(_loopback(h), p) for h, p in upstreams]
        first = checked[0]
        assert first is not None
        super().__init__(
            first[0],
            first[1],
            seed=seed,
            plan=plan,
            host=host,
            port=port,
            connect_timeout=connect_timeout,
        )
        self._slots = checked
        self._next = 0
        self._link_slot: dict[_Link, int] = {}
        self._partitioned: set[int] = set()
        self.connections_to: Counter[int] = Counter()

    # The fleet

    @property
    def upstreams(self) -> list[tuple[str, int] | None]:
        """Each slot's address, None for a removed one."""
        return list(self._slots)

    def replace(self, index: int, host: str, port: int) -> None:
        """Point slot ``index`` at ``(host, port)`` (a restarted instance) for new
        connections; connections already made to the old address are untouched."""
        self._check(index)
        self._slots[index] = (_loopback(host), port)

    def remove(self, index: int) -> None:
        """Send no new connection to slot ``index`` until :meth:`replace` fills it again."""
        self._check(index)
        self._slots[index] = None

    def kill_upstream(self, index: int) -> int:
        """Reset every live connection to slot ``index`` now (each client gets a TCP RST);
        returns how many were cut. New connections still try the slot: :meth:`remove` it
        too if it is not to take any."""
        self._check(index)
        links = [link for link in self._live(index) if not link.dead]
        for link in links:
            self._cut(link, Fault.CUT_UPSTREAM)
        return len(links)

    def partition(self, index: int, on: bool = True) -> int:
        """Hold every byte to and from slot ``index``, without closing anything: its
        connections stay open at both ends, silent (a network partition, or a host that
        froze). A client gives up on its own (heartbeat) and reconnects elsewhere, while the
        instance still holds its stale half of the connection; when the partition lifts, the
        held bytes are delivered in order. New connections to the slot are held too, so
        :meth:`remove` it meanwhile if the clients are to reach the others. Returns how many
        live connections changed."""
        self._check(index)
        if on:
            self._partitioned.add(index)
        else:
            self._partitioned.discard(index)
        links = [link for link in self._live(index) if link.flowing.is_set() == on]
        for link in links:
            if on:
                link.flowing.clear()
            else:
                link.flowing.set()
        self._notify()
        return len(links)

    def partitioned(self, index: int) -> bool:
        self._check(index)
        return index in self._partitioned

    def clients_on(self, index: int) -> int:
        """Connections to slot ``index`` whose client has not closed its side: the clients
        that would notice if the slot went silent."""
        self._check(index)
        return sum(1 for link in self._live(index) if not link.dead and not link.client_done)

    def active_to(self, index: int) -> int:
        """Connections currently proxied to slot ``index``."""
        self._check(index)
        return len(self._live(index))

    def _check(self, index: int) -> None:
        if not 0 <= index < len(self._slots):
            raise IndexError(f"no upstream slot {index}: the proxy has {len(self._slots)}")

    def _live(self, index: int) -> list[_Link]:
        self._prune()
        return [link for link, slot in self._link_slot.items() if slot == index]

    def _prune(self) -> None:
        for link in [link for link in self._link_slot if link not in self._links]:
            del self._link_slot[link]

    # FaultProxy's seam

    async def _open_upstream(
        self, link: _Link
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Try each slot once, starting after the one the previous connection got."""
        self._prune()
        count = len(self._slots)
        start = self._next
        self._next = (start + 1) % count  # the next connection starts further on, whatever happens
        for step in range(count):
            index = (start + step) % count
            address = self._slots[index]
            if address is None:
                continue
            try:
                async with asyncio.timeout(self.connect_timeout):
                    opened = await asyncio.open_connection(*address)
            except (OSError, TimeoutError) as exc:
                logger.debug("round-robin proxy: upstream %d %s refused: %r", index, address, exc)
                continue
            self._next = (index + 1) % count
            self._link_slot[link] = index
            if index in self._partitioned:
                link.flowing.clear()
            self.connections_to[index] += 1
            return opened
        logger.debug("round-robin proxy: no upstream accepted connection %d", link.number)
        return None
