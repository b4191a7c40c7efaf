"""WakeEvents: every replica's wake and revoke announcements reach a subscriber as models, a
quiet channel answers None in time, and a subscription whose Redis died says so (the listener
then reconnects and wakes every pump)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from broker.errors import StoreUnavailable
from broker.models import Echo, Flow, Revoke, Wake
from broker.store.keys import REVOKE_CHANNEL, WAKE_CHANNEL
from broker.store.redis_store import RedisStore
from tests.support.redis_server import RedisServer


async def test_announcements_arrive_in_order_as_models(store: RedisStore) -> None:
    await store.ping()  # a Cluster client learns its nodes
    async with store.wake_events() as events:
        await store.client.publish(WAKE_CHANNEL, "emails")
        await store.client.publish(REVOKE_CHANNEL, "emails:01J0000000000000000000000 " + "a" * 32)
        await store.client.publish(WAKE_CHANNEL, "reports")
        await store.client.publish(store.echo_channel, "reports")

        seen: list[Wake | Revoke | Flow | Echo] = []
        while len(seen) < 4:
            event = await events.next(timeout_s=5.0)
            if event is not None:  # the subscription's confirmations come first, as None
                seen.append(event)

    assert seen == [
        Wake("emails"),
        Revoke("emails:01J0000000000000000000000", "a" * 32),
        Wake("reports"),
        Echo("reports"),
    ]


async def test_a_quiet_channel_answers_none(store: RedisStore) -> None:
    await store.ping()
    async with store.wake_events() as events:
        for _ in range(3):  # the confirmations, then nothing
            assert await events.next(timeout_s=0.05) is None


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test alone: it is killed."""
    with RedisServer() as server:
        yield server


async def test_a_subscription_whose_redis_died_is_unavailable(own_redis: RedisServer) -> None:
    store = RedisStore(aioredis.Redis.from_url(own_redis.url))
    try:
        async with store.wake_events() as events:
            await events.next(timeout_s=0.05)
            own_redis.kill()
            with pytest.raises(StoreUnavailable):
                # (The first few reads may still find buffered subscription confirmations.)
                for _ in range(10):
                    await events.next(timeout_s=1.0)
    finally:
        await store.close()
