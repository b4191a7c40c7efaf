"""Commands written to a standalone Redis in one write, and their replies read back: what
redis-py's Pipeline does, without its per-call bookkeeping (a command stack, response callbacks,
timing hooks, a pool checkout with its lock and its socket probe, a task per write for the
timeout). For a lone Enqueue that bookkeeping was about half of its Redis round trip's CPU
(issue 15)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.connection import AbstractConnection

#: Arguments up to this size are formatted with their header in one step.
_INLINE_BYTES: Final = 4096


class CommandLane:
    """Sends commands on a connection it holds while that one is free, and on a pooled one
    (send_commands) while it is busy, so concurrent callers never wait for each other here.

    The held connection is checked out of the client's pool once and never given back (it
    counts against max_connections, and closing the client closes it). It has no socket
    timeout or health-check PING of its own: one timeout, the client's socket timeout, bounds
    each whole exchange (connecting included), and a connection left out of step by a timeout,
    an error or a cancel is closed, to be opened afresh by the next exchange."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._timeout_s: float | None = client.connection_pool.connection_kwargs.get(
            "socket_timeout"
        )
        self._conn: AbstractConnection | None = None
        self._busy = False

    async def send(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """The commands' replies in order, an error reply as its exception (not raised), as
        `pipeline(transaction=False).execute(raise_on_error=False)` gives them. A dropped
        connection is retried as the client's Retry says, as a pipeline is.

        Raises:
            redis.exceptions.ConnectionError, redis.exceptions.TimeoutError: Redis could not
                be reached (after the client's retries).
        """
        if self._busy:
            return await send_commands(self._client, commands)
        self._busy = True
        try:
            conn = self._conn or await self._check_out()
            try:
                replies: list[Any] = await conn.retry.call_with_retry(
                    lambda: self._exchange(conn, commands), self._disconnect
                )
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
            return replies
        finally:
            self._busy = False

    async def _check_out(self) -> AbstractConnection:
        pool = self._client.connection_pool
        conn: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
        conn.socket_timeout = None  # the exchange's own timeout bounds it
        conn.health_check_interval = 0
        self._conn = conn
        return conn

    async def _exchange(
        self, conn: AbstractConnection, commands: Sequence[Sequence[Any]]
    ) -> list[Any]:
        try:
            async with asyncio.timeout(self._timeout_s):
                await conn.send_packed_command(pack(commands), check_health=False)
                return await _replies(conn, len(commands))
        except TimeoutError:
            await conn.disconnect(nowait=True)
            raise rex.TimeoutError("Timeout talking to Redis") from None

    async def _disconnect(self, error: Exception) -> None:
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)


async def send_commands(client: aioredis.Redis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """As CommandLane.send, on a connection from the client's pool."""
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:

        async def disconnect(error: Exception) -> None:
            await conn.disconnect()

        async def exchange() -> list[Any]:
            await conn.send_packed_command(pack(commands))
            return await _replies(conn, len(commands))

        replies: list[Any] = await conn.retry.call_with_retry(exchange, disconnect)
        return replies
    finally:
        await pool.release(conn)


async def _replies(conn: AbstractConnection, count: int) -> list[Any]:
    replies: list[Any] = []
    for _ in range(count):  # every reply is read, so the connection never falls out of step
        try:
            replies.append(await conn.read_response())
        except rex.ResponseError as exc:
            replies.append(exc)
    return replies


def pack(commands: Sequence[Sequence[Any]]) -> bytes:
    """The commands in the Redis protocol (RESP arrays of bulk strings), as redis-py's
    pack_commands writes them with its default encoder (str as UTF-8, int and float by repr),
    in one join rather than one per argument: an enqueue's script call has about 30.

    Raises:
        redis.exceptions.DataError: An argument is not bytes, str, int or float.
    """
    parts: list[bytes] = []
    append = parts.append
    small_ints = _SMALL_INT_BULKS
    for args in commands:
        append(b"*%d\r\n" % len(args))
        for arg in args:
            kind = type(arg)  # the exact types first: nearly every argument is one of them
            if kind is str:
                if not arg:
                    append(b"$0\r\n\r\n")
                    continue
                data = arg.encode()
            elif kind is bytes:
                data = arg
            elif kind is int:
                bulk = small_ints.get(arg)
                if bulk is not None:
                    append(bulk)
                    continue
                data = b"%d" % arg
            else:
                data = _encoded(arg)
            if len(data) > _INLINE_BYTES:  # copied once, by the join, not also here
                parts += (b"$%d\r\n" % len(data), data, b"\r\n")
            else:
                append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


#: Small ints as whole bulk strings: an enqueued task's arguments are mostly small numbers and
#: empty strings (its priority, attempts, -1 for "no delay"), each formatted twice otherwise.
_SMALL_INT_BULKS: Final = {i: b"$%d\r\n%d\r\n" % (len(b"%d" % i), i) for i in range(-1, 1025)}


def _encoded(arg: object) -> bytes:
    """An argument of any other type, as redis-py's default encoder writes it."""
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, int | float) and not isinstance(arg, bool):
        return repr(arg).encode()
    raise rex.DataError(f"cannot send a {type(arg).__name__} to Redis")
