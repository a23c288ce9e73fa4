"""The round-robin proxy, through real sockets: a few TCP servers on port 0 that each answer
with their own name, and raw TCP clients in front of the proxy.

Waits are on the proxy's own state (``wait_until``) or on reads, each bounded by
``asyncio.timeout``; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from outbox.testing.fault_proxy import Fault
from outbox.testing.round_robin import RoundRobinProxy

# Fail a test if asyncio reported an error (a task destroyed pending, an exception never
# retrieved) or the proxy logged a warning (e.g. tasks that did not end on close).
from .test_fault_proxy import no_loop_errors  # noqa: F401

pytestmark = pytest.mark.timeout(10)

STEP = 2.0
"""Upper bound for any single wait on something that is certain to happen."""


class NamedServer:
    """A TCP server that answers each chunk it reads with ``NAME:chunk``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server: asyncio.Server | None = None
        self.port = 0
        self.accepted = 0

    async def start(self) -> NamedServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while chunk := await reader.read(1024):
                writer.write(self.name.encode() + b":" + chunk)
                await writer.drain()
        except OSError:
            pass  # the proxy reset us: what some tests do
        finally:
            writer.close()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


@pytest.fixture
async def servers() -> AsyncIterator[list[NamedServer]]:
    fleet = [await NamedServer(name).start() for name in ("a", "b", "c")]
    try:
        yield fleet
    finally:
        for server in fleet:
            await server.stop()


@pytest.fixture
async def proxy(servers: list[NamedServer]) -> AsyncIterator[RoundRobinProxy]:
    async with RoundRobinProxy([s.address for s in servers], seed=1) as proxy:
        yield proxy


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.upstream = ""
        """The name of the server that answered the first question."""

    @classmethod
    async def open(cls, proxy: RoundRobinProxy) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        return cls(reader, writer)

    async def ask(self, text: str) -> str:
        """Who answers ``text``: the server's name (the reply is ``NAME:text``)."""
        self.writer.write(text.encode())
        async with asyncio.timeout(STEP):
            reply = await self.reader.read(1024)
        name, _, echoed = reply.decode().partition(":")
        assert echoed == text, f"unexpected reply {reply!r}"
        return name

    async def ended(self) -> bool:
        """True once the connection is closed or reset by the other side."""
        try:
            async with asyncio.timeout(STEP):
                return await self.reader.read(1024) == b""
        except ConnectionResetError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def clients(proxy: RoundRobinProxy, n: int, ask: bool = True) -> AsyncIterator[list[Client]]:
    """``n`` connections, one after the other: each is answered (its upstream chosen)
    before the next opens, so the order of the turns is certain."""
    opened: list[Client] = []
    try:
        for i in range(n):
            opened.append(client := await Client.open(proxy))
            if ask:
                client.upstream = await client.ask(f"hello {i}")
        yield opened
    finally:
        for client in opened:
            await client.close()


def names(group: list[Client]) -> list[str]:
    return [client.upstream for client in group]


async def test_connections_go_to_each_upstream_in_turn(proxy: RoundRobinProxy) -> None:
    async with clients(proxy, 6) as group:
        assert names(group) == ["a", "b", "c", "a", "b", "c"]
        assert [proxy.active_to(i) for i in range(3)] == [2, 2, 2]
    assert proxy.connections_to == {0: 2, 1: 2, 2: 2}


async def test_an_upstream_that_refuses_is_skipped(
    proxy: RoundRobinProxy, servers: list[NamedServer]
) -> None:
    await servers[1].stop()  # its process died: connecting to its port is refused
    async with clients(proxy, 4) as group:
        assert names(group) == ["a", "c", "a", "c"]
    assert proxy.stats.upstream_failures == 0


async def test_no_upstream_accepting_resets_the_client(
    proxy: RoundRobinProxy, servers: list[NamedServer]
) -> None:
    for server in servers:
        await server.stop()
    async with clients(proxy, 1, ask=False) as (client,):
        assert await client.ended()
    assert proxy.stats.upstream_failures == 1


async def test_kill_upstream_cuts_only_its_connections(proxy: RoundRobinProxy) -> None:
    async with clients(proxy, 6) as group:
        assert proxy.kill_upstream(1) == 2
        assert proxy.stats.faults[Fault.CUT_UPSTREAM] == 2
        assert proxy.stats.cuts == 2
        assert [await group[i].ended() for i in (1, 4)] == [True, True]
        # The others carry on, on the same upstreams.
        assert [await group[i].ask("still") for i in (0, 2, 3, 5)] == ["a", "c", "a", "c"]
        async with asyncio.timeout(STEP):
            await proxy.wait_until(lambda: proxy.active_to(1) == 0)
        assert proxy.kill_upstream(1) == 0


async def test_replace_and_remove(proxy: RoundRobinProxy, servers: list[NamedServer]) -> None:
    restarted = await NamedServer("b2").start()
    try:
        proxy.replace(1, *restarted.address)
        proxy.remove(2)
        assert proxy.upstreams == [servers[0].address, restarted.address, None]
        async with clients(proxy, 4) as group:
            assert names(group) == ["a", "b2", "a", "b2"]
        assert servers[2].accepted == 0
    finally:
        await restarted.stop()


async def test_partition_holds_one_upstream_without_closing(
    proxy: RoundRobinProxy, servers: list[NamedServer]
) -> None:
    async with clients(proxy, 3) as group:
        assert proxy.partition(1) == 1
        assert proxy.partitioned(1)
        group[1].writer.write(b"held")
        # The others carry on; the held bytes are inside the proxy, so nothing can arrive.
        assert [await group[i].ask("free") for i in (0, 2)] == ["a", "c"]
        async with asyncio.timeout(STEP):
            await proxy.wait_until(lambda: proxy.stats.received["upstream"] >= 3 * 7 + 8 + 4)
        assert proxy.stats.forwarded["upstream"] == proxy.stats.received["upstream"] - 4
        assert proxy.active_to(1) == 1  # still open at both ends
        # Removed, the partitioned slot takes no new connection: it goes to the next one.
        proxy.remove(1)
        async with clients(proxy, 1) as (moved,):
            assert moved.upstream == "a"
        assert proxy.partition(1, on=False) == 1
        async with asyncio.timeout(STEP):
            reply = await group[1].reader.read(1024)
        assert reply == b"b:held"
    assert servers[1].accepted == 1


async def test_clients_on_leaves_out_clients_that_closed_their_side(
    proxy: RoundRobinProxy,
) -> None:
    async with clients(proxy, 4) as group:
        assert [proxy.clients_on(i) for i in range(3)] == [2, 1, 1]
        proxy.partition(0)  # the upstream cannot answer the EOF: the connection stays
        group[3].writer.write_eof()
        async with asyncio.timeout(STEP):
            await proxy.wait_until(lambda: proxy.clients_on(0) == 1)
        assert proxy.active_to(0) == 2


async def test_faults_of_the_fault_proxy_apply_to_every_upstream(proxy: RoundRobinProxy) -> None:
    async with clients(proxy, 3) as group:
        assert proxy.cut_all() == 3
        assert all([await client.ended() for client in group])


async def test_bad_arguments_say_what_is_wrong(servers: list[NamedServer]) -> None:
    with pytest.raises(ValueError, match="at least one upstream"):
        RoundRobinProxy([])
    with pytest.raises(ValueError, match="not a loopback address"):
        RoundRobinProxy([servers[0].address, ("192.0.2.1", 80)])
    proxy = RoundRobinProxy([servers[0].address])
    with pytest.raises(IndexError, match="no upstream slot 1: the proxy has 1"):
        proxy.kill_upstream(1)
