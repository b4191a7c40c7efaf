"""CommandLane: commands go out in one write and each gets its reply, in order, an error reply
as its exception; callers at once each get their own replies; and a timeout, a cancel or a
Redis that died leaves the lane in step, answering the next call correctly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from broker.store.wire import CommandLane, pack
from tests.support.redis_server import RedisServer


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test alone (some tests kill it)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def client(own_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    # The broker's settings in small: one retry, and a timeout a test can wait out.
    client = aioredis.Redis.from_url(own_redis.url, socket_timeout=0.5, retry=Retry(NoBackoff(), 1))
    yield client
    await client.aclose()


async def test_replies_come_in_order_and_an_error_reply_is_returned_not_raised(
    client: aioredis.Redis,
) -> None:
    lane = CommandLane(client)

    replies = await lane.send([("SET", "k", "v"), ("INCR", "k"), ("GET", "k")])

    assert replies[0] == b"OK"
    assert isinstance(replies[1], rex.ResponseError)
    assert replies[2] == b"v"
    [missing] = await lane.send([("EVALSHA", "0" * 40, 0)])
    assert isinstance(missing, rex.NoScriptError)


async def test_callers_at_once_each_get_their_own_replies(client: aioredis.Redis) -> None:
    lane = CommandLane(client)

    calls = [lane.send([("INCRBY", "n", i), ("ECHO", i)]) for i in range(1, 51)]
    replies = await asyncio.gather(*calls)

    assert [r[1] for r in replies] == [str(i).encode() for i in range(1, 51)]
    assert len({r[0] for r in replies}) == 50  # each INCRBY ran once
    assert int(await client.get("n") or 0) == sum(range(1, 51))


async def test_a_timed_out_exchange_leaves_the_lane_in_step(client: aioredis.Redis) -> None:
    lane = CommandLane(client)

    with pytest.raises(rex.TimeoutError):  # Redis holds the reply past the 0.5 s timeout
        await lane.send([("BLPOP", "nothing", 2)])

    assert await lane.send([("ECHO", "after")]) == [b"after"]


async def test_a_cancelled_exchange_leaves_the_lane_in_step(client: aioredis.Redis) -> None:
    lane = CommandLane(client)
    blocked = asyncio.create_task(lane.send([("BLPOP", "list", 0.3)]))
    await asyncio.sleep(0.05)

    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    for _ in range(100):  # until Redis has seen the lane hang up
        if not (await client.info("clients"))["blocked_clients"]:
            break
        await asyncio.sleep(0.01)
    await client.rpush("list", "late")  # the cancelled BLPOP's reply must not reach anyone

    assert await lane.send([("ECHO", "after")]) == [b"after"]
    assert await client.lrange("list", 0, -1) == [b"late"]


async def test_a_redis_that_died_and_came_back_is_reached_again(
    own_redis: RedisServer, client: aioredis.Redis
) -> None:
    lane = CommandLane(client)
    assert await lane.send([("ECHO", "before")]) == [b"before"]

    own_redis.kill()
    with pytest.raises(rex.ConnectionError):
        await lane.send([("ECHO", "meanwhile")])
    own_redis.start()

    assert await lane.send([("ECHO", "after")]) == [b"after"]


async def test_closing_the_client_closes_the_lanes_connection(own_redis: RedisServer) -> None:
    client = aioredis.Redis.from_url(own_redis.url)
    lane = CommandLane(client)
    await lane.send([("CLIENT", "SETNAME", "lane")])
    with own_redis.client() as admin:
        assert any(c["name"] == "lane" for c in admin.client_list())

        await client.aclose()

        for _ in range(100):
            if not any(c["name"] == "lane" for c in admin.client_list()):
                return
            await asyncio.sleep(0.01)
    raise AssertionError("the lane's connection outlived its client")


class _Text(str):
    pass


class _Number(int):
    pass


@pytest.mark.parametrize(
    "commands",
    [
        [("SET", "k", "v")],
        [("EVALSHA", "a" * 40, 2, "tb:{q}:pending", "tb:{q}:stats", -1, 0, 3.5, "", b"\x00\xff")],
        [("HSET", "h", "payload", bytes(100_000)), ("SADD", "tb:queues", "é")],
        [("SET", _Text("k"), _Number(7))],  # subclasses: not the exact types
        # Small ints and the empty string have their encodings ready: at and past the edges.
        [("EVAL", "", 0, -2, -1, 0, 1, 9, 10, 1024, 1025, 10**20, -(10**20), "", b"", _Text(""))],
    ],
)
def test_pack_writes_what_redis_py_writes(commands: list[tuple[str | bytes | float, ...]]) -> None:
    expected = b"".join(aioredis.Connection().pack_commands(commands))
    assert pack(commands) == expected


@pytest.mark.parametrize("arg", [True, None, ["a"]])
def test_pack_refuses_what_redis_py_refuses(arg: object) -> None:
    with pytest.raises(rex.DataError):
        pack([("SET", "k", arg)])
