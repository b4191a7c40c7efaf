"""Commands written to a standalone Redis in one write on one pooled connection: what redis-py's
Pipeline does, without its per-call bookkeeping (a command stack, response callbacks, timing
hooks, a reset), which cost a lone Enqueue about a third of its Redis round trip's CPU
(issue 15)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.connection import AbstractConnection


async def send_commands(client: aioredis.Redis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Sends the commands in one write and returns their replies in order, an error reply as
    its exception (not raised), as `pipeline(transaction=False).execute(raise_on_error=False)`
    does. A dropped connection is retried as the client's Retry says, like a pipeline.

    Raises:
        redis.exceptions.ConnectionError, redis.exceptions.TimeoutError: Redis could not be
            reached (after the client's retries).
    """
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:

        async def disconnect(error: Exception) -> None:
            await conn.disconnect()

        replies: list[Any] = await conn.retry.call_with_retry(
            lambda: _exchange(conn, commands), disconnect
        )
        return replies
    finally:
        await pool.release(conn)


async def _exchange(conn: AbstractConnection, commands: Sequence[Sequence[Any]]) -> list[Any]:
    await conn.send_packed_command(conn.pack_commands(commands))
    replies: list[Any] = []
    for _ in commands:  # every reply is read, so the pooled connection never falls out of step
        try:
            replies.append(await conn.read_response())
        except rex.ResponseError as exc:
            replies.append(exc)
    return replies
