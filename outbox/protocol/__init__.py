"""The protocol's rules, pure: no socket, no clock, no database, no event loop.

- ``codec``: JSON text in and out (orjson when installed, the standard library otherwise).
- ``wire``: frames from client and server, parsed and encoded; what to do with a bad frame.
- ``window``: the ack window: in flight, timeouts, resends, dead rows.
- ``feed``: which freshly committed rows the sender may take from memory.
- ``batching``: rows packed into frames.
- ``heartbeat``: when a silent connection is presumed dead.
- ``backoff``: reconnect delays.

A test enforces the line: nothing here imports asyncio, sqlite3, aiosqlite or
websockets.asyncio.
"""
