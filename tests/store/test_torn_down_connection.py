"""A write to a Redis connection whose transport was torn down meanwhile (a failover, Redis
closing it) leaks out of redis-py as AttributeError or TypeError, not ConnectionError (redis-py
issue #4287). The store answers it as Redis being unavailable, which clients retry, and not as
an internal error; the same errors from anywhere else stay bugs."""

from __future__ import annotations

import pytest
from redis.asyncio import Connection

from broker.errors import StoreUnavailable
from broker.store.redis_store import _translate


async def test_a_write_on_a_torn_down_connection_is_unavailable() -> None:
    connection = Connection()  # never connected: its writer is None, as after a teardown
    lost = pytest.raises(StoreUnavailable, match="lost its connection to Redis; retry")
    with lost, _translate():
        await connection._send_packed_command([b"PING\r\n"])


def test_the_same_errors_from_our_own_code_stay_bugs() -> None:
    with pytest.raises(AttributeError), _translate():
        _ = None.writelines  # type: ignore[attr-defined]
