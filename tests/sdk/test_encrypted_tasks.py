"""Encrypted tasks through a real broker and Redis: the broker stores only ciphertext, handlers see
plaintext, results come back decrypted, and a worker without the key dead-letters the task at once
with an error naming the key id."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis

from taskbroker import (
    AesGcmCodec,
    Client,
    Keyring,
    NewTask,
    SyncClient,
    TaskContext,
    TaskState,
    Worker,
    chord,
    handler,
)
from taskbroker.encryption import CodecContext
from taskbroker.envelope import MAGIC, parse_header
from tests.conftest import RunningBroker

K1, K2 = os.urandom(32), os.urandom(32)
SECRET = b'{"card": "4111 1111 1111 1111"}'
SECRET_RESULT = b"charged card ending 1111"

seen: list[bytes] = []


@handler("charge")
async def charge(ctx: TaskContext, payload: bytes) -> bytes:
    seen.append(payload)
    return SECRET_RESULT


@pytest.fixture(autouse=True)
def clear_seen() -> Iterator[None]:
    seen.clear()
    yield
    seen.clear()


def codec(keys: dict[str, bytes], active: str | None = None, **options: bool) -> AesGcmCodec:
    return AesGcmCodec(Keyring(keys, active), **options)


@pytest.fixture
async def plain(running: RunningBroker) -> AsyncIterator[Client]:
    """A client without a codec: what the broker shows anyone who reads it."""
    async with Client(running.target) as client:
        yield client


def run_once(client: Client) -> Worker:
    return Worker(
        client, queues=["billing"], handlers=[charge], shutdown_grace=timedelta(seconds=1)
    )


def redis_values(client: redis.Redis) -> Iterator[bytes]:
    """Every key name and value in Redis, whatever the key's type."""
    r: Any = client  # redis-py's replies are typed bytes | str; this client returns bytes
    for key in r.scan_iter(count=1000):
        yield key
        kind = r.type(key)
        if kind == b"string":
            yield r.get(key) or b""
        elif kind == b"hash":
            for field, value in r.hgetall(key).items():
                yield field
                yield value
        elif kind == b"list":
            yield from r.lrange(key, 0, -1)
        elif kind == b"set":
            yield from r.smembers(key)
        elif kind == b"zset":
            yield from r.zrange(key, 0, -1)
        elif kind == b"stream":
            for _, fields in r.xrange(key):
                yield from (item for pair in fields.items() for item in pair)


async def test_the_broker_stores_only_ciphertext_and_the_handler_sees_plaintext(
    running: RunningBroker, plain: Client, redis_client: redis.Redis
) -> None:
    async with Client(running.target, codec=codec({"k1": K1, "k2": K2})) as client:
        task_id = await client.enqueue("billing", "charge", SECRET, max_attempts=3)
        assert await run_once(client).run_until_idle() == 1
        task = await client.wait(task_id, timeout=5)

    # The handler got the plaintext; the producer reads plaintext payload and result back.
    assert seen == [SECRET]
    assert (task.state, task.payload, task.result) == (TaskState.SUCCEEDED, SECRET, SECRET_RESULT)

    # Through the API without the key: envelopes, naming key k2.
    stored = await plain.get_task(task_id)
    for value in (stored.payload, stored.result):
        assert value.startswith(MAGIC) and parse_header(value).key_id == "k2"
    assert SECRET not in stored.payload and SECRET_RESULT not in stored.result

    # In Redis: neither the payload nor the result appears anywhere.
    values = list(redis_values(redis_client))
    assert any(v == stored.payload for v in values)  # the scan does reach the task hash
    assert not any(SECRET in v or SECRET_RESULT in v for v in values)


async def test_a_worker_without_the_key_dead_letters_the_task_naming_the_key(
    running: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    async with Client(running.target, codec=codec({"k1": K1, "k2": K2})) as producer:
        task_id = await producer.enqueue("billing", "charge", SECRET, max_attempts=5)
        async with Client(running.target, codec=codec({"k1": K1})) as stale:
            with caplog.at_level(logging.DEBUG, logger="taskbroker"):
                assert await run_once(stale).run_until_idle() == 1
        task = await producer.wait(task_id, timeout=5)

    assert seen == []  # the handler never ran
    assert (task.state, task.attempt) == (TaskState.DEAD, 1)  # no retry of an undecodable task
    assert "encrypted with key 'k2', which this keyring does not hold" in task.last_error
    assert "'billing'" in task.last_error and "'charge'" in task.last_error
    log = caplog.text.encode()
    assert SECRET not in log and K1 not in log and K2 not in log


async def test_a_tampered_payload_is_dead_lettered(running: RunningBroker, plain: Client) -> None:
    sealed = bytearray(codec({"k1": K1}).encode(SECRET, CodecContext.payload("billing", "charge")))
    sealed[-1] ^= 0x01
    task_id = await plain.enqueue("billing", "charge", bytes(sealed), max_attempts=5)
    async with Client(running.target, codec=codec({"k1": K1})) as client:
        assert await run_once(client).run_until_idle() == 1
    task = await plain.get_task(task_id)
    assert seen == []
    assert (task.state, task.attempt) == (TaskState.DEAD, 1)
    assert "does not decrypt with key 'k1'" in task.last_error


async def test_a_plaintext_task_is_refused_unless_plaintext_is_allowed(
    running: RunningBroker, plain: Client
) -> None:
    refused = await plain.enqueue("billing", "charge", SECRET, max_attempts=5)
    async with Client(running.target, codec=codec({"k1": K1})) as strict:
        assert await run_once(strict).run_until_idle() == 1
    task = await plain.get_task(refused)
    assert (task.state, task.attempt) == (TaskState.DEAD, 1)
    assert "is not encrypted" in task.last_error and "refuses plaintext" in task.last_error
    assert seen == []

    accepted = await plain.enqueue("billing", "charge", SECRET)
    async with Client(running.target, codec=codec({"k1": K1}, allow_plaintext=True)) as lenient:
        assert await run_once(lenient).run_until_idle() == 1
        task = await lenient.get_task(accepted)
    assert seen == [SECRET]
    assert (task.state, task.result) == (TaskState.SUCCEEDED, SECRET_RESULT)


async def test_rotation_old_tasks_still_run_and_new_ones_use_the_new_key(
    running: RunningBroker, plain: Client
) -> None:
    async with Client(running.target, codec=codec({"k1": K1})) as before:
        old = await before.enqueue("billing", "charge", b"old")
    async with Client(running.target, codec=codec({"k1": K1, "k2": K2})) as after:
        new = await after.enqueue("billing", "charge", b"new")
        assert parse_header((await plain.get_task(old)).payload).key_id == "k1"
        assert parse_header((await plain.get_task(new)).payload).key_id == "k2"
        assert await run_once(after).run_until_idle() == 2
        assert (await after.wait(old, timeout=5)).result == SECRET_RESULT
    assert sorted(seen) == [b"new", b"old"]


async def test_enqueue_many_and_the_sync_client_encrypt_too(
    running: RunningBroker, plain: Client
) -> None:
    tasks = [NewTask("billing", "charge", SECRET), NewTask("billing", "charge", b"")]
    async with Client(running.target, codec=codec({"k1": K1})) as client:
        ids = [r.task_id for r in await client.enqueue_many(tasks)]
    with SyncClient(running.target, codec=codec({"k1": K1})) as sync:
        # The broker runs on this test's event loop: block a thread, not the loop.
        ids.append(await asyncio.to_thread(sync.enqueue, "billing", "charge", SECRET))
        task = await asyncio.to_thread(sync.get_task, ids[-1])
    assert task.payload == SECRET
    for task_id in ids:
        stored = (await plain.get_task(task_id)).payload
        assert stored.startswith(MAGIC) and SECRET not in stored


async def test_resending_a_task_with_its_idempotency_key_is_still_a_duplicate(
    running: RunningBroker,
) -> None:
    async with Client(running.target, codec=codec({"k1": K1})) as client:
        first = await client.enqueue("billing", "charge", SECRET, idempotency_key="order-1")
        again = await client.enqueue("billing", "charge", SECRET, idempotency_key="order-1")
        (result,) = await client.enqueue_many(
            [NewTask("billing", "charge", SECRET, idempotency_key="order-1")]
        )
    assert again == first and (result.task_id, result.duplicate) == (first, True)


fan_in_saw: list[tuple[str, bytes]] = []


@handler("summarize")
async def summarize(ctx: TaskContext, payload: bytes) -> bytes:
    fan_in_saw.extend((p.task_id, p.result) for p in ctx.parent_results)
    return b"summary"


async def test_a_fan_in_handler_reads_its_parents_encrypted_results_decrypted(
    running: RunningBroker, plain: Client
) -> None:
    fan_in_saw.clear()
    async with Client(running.target, codec=codec({"k1": K1})) as client:
        flow = await client.enqueue_workflow(
            chord(
                [NewTask("billing", "charge", SECRET), NewTask("billing", "charge", SECRET)],
                NewTask("reports", "summarize", b"{}"),
            )
        )
        worker = Worker(
            client,
            queues=["billing", "reports"],
            handlers=[charge, summarize],
            shutdown_grace=timedelta(seconds=1),
        )
        assert await worker.run_until_idle() == 3
        done = await client.wait(flow.last, timeout=5)
        # The producer reads them decrypted too.
        assert [p.result for p in done.parent_results] == [SECRET_RESULT, SECRET_RESULT]
    assert fan_in_saw == [(t, SECRET_RESULT) for t in flow.task_ids[:2]]
    # Without the key: each parent's result as its worker sealed it, bound to its own type.
    stored = await plain.get_task(flow.last)
    assert [p.type for p in stored.parent_results] == ["charge", "charge"]
    assert all(parse_header(p.result).key_id == "k1" for p in stored.parent_results)
