"""Concurrent single-task enqueue() calls on one Client share Enqueue calls (group commit), and
each caller still gets exactly its own answer: its task's id, or the error its task alone
meets, with the other callers' tasks stored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.config import Settings
from taskbroker import AlreadyExistsError, Client, InvalidArgumentError
from tests.conftest import RunningBroker, start_broker

CALLERS = 200
ENQUEUE = "taskbroker.v1.BrokerService/Enqueue"


@pytest.fixture
async def small_tasks(settings: Settings) -> AsyncIterator[RunningBroker]:
    """A broker whose task size limit is 1 KiB, so a task the SDK accepts can be refused."""
    running = await start_broker(settings, max_task_bytes=1024)
    yield running
    await running.close()


async def enqueue_calls(running: RunningBroker) -> dict[str, float]:
    """Enqueue calls the broker served, by status code (its /metrics)."""
    url = f"http://127.0.0.1:{running.broker.http_port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        text = await response.text()
    return {
        s.labels["code"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "taskbroker_rpc_duration_seconds_count" and s.labels["method"] == ENQUEUE
    }


async def test_concurrent_callers_share_calls_and_each_gets_its_own_task(
    small_tasks: RunningBroker,
) -> None:
    async with Client(small_tasks.target) as client:
        payloads = [b"task-%d" % i for i in range(CALLERS)]
        ids = await asyncio.gather(*(client.enqueue("q", "t", p) for p in payloads))
        for task_id, payload in zip(ids, payloads, strict=True):
            assert (await client.get_task(task_id)).payload == payload
        assert len(set(ids)) == CALLERS
    calls = (await enqueue_calls(small_tasks))["OK"]
    assert calls < CALLERS / 4, calls  # at most 4 calls in flight: the rest went in batches


async def test_a_caller_alone_is_never_held_back(small_tasks: RunningBroker) -> None:
    async with Client(small_tasks.target) as client:
        for i in range(5):
            await client.enqueue("q", "t", b"%d" % i)
    for _ in range(100):  # the broker counts a call as it ends, maybe just after the client
        if (await enqueue_calls(small_tasks)).get("OK") == 5:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"Enqueue calls: {await enqueue_calls(small_tasks)}, not 5")


async def test_a_refused_task_fails_alone_and_the_others_are_stored(
    small_tasks: RunningBroker,
) -> None:
    async with Client(small_tasks.target) as client:
        await client.enqueue("q", "t", b"first", idempotency_key="taken")
        calls = [client.enqueue("q", "t", b"ok-%d" % i) for i in range(50)]
        calls.insert(10, client.enqueue("q", "t", bytes(4096)))  # past the broker's 1 KiB
        calls.insert(30, client.enqueue("q", "t", b"other", idempotency_key="taken"))
        calls.append(client.enqueue("q", "t", b"keyed", idempotency_key="fresh"))
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        reused, too_big = outcomes.pop(30), outcomes.pop(10)
        assert isinstance(reused, AlreadyExistsError), reused
        assert isinstance(too_big, InvalidArgumentError) and "payload" in str(too_big), too_big
        assert all(isinstance(o, str) for o in outcomes), outcomes
        for task_id, i in zip(outcomes[:50], range(50), strict=True):
            assert isinstance(task_id, str)
            assert (await client.get_task(task_id)).payload == b"ok-%d" % i
        stats = await client.stats("q")
        assert stats[0].pending == 1 + 50 + 1  # nothing twice, nothing refused stored


async def test_a_caller_that_gives_up_does_not_fail_the_others(
    small_tasks: RunningBroker,
) -> None:
    async with Client(small_tasks.target) as client:
        calls = [asyncio.create_task(client.enqueue("q", "t", b"%d" % i)) for i in range(100)]
        await asyncio.sleep(0)
        calls[50].cancel()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(outcomes.pop(50), asyncio.CancelledError)
        assert all(isinstance(o, str) for o in outcomes), outcomes
