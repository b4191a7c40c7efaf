"""Fresh pending tasks (docs/data-model.md): a task enqueued ready to run is one entry of its
priority's stream and has no key of its own until it is leased or cancelled. What users see is
the same as for any task, on standalone Redis and on a Redis Cluster: reads, cancels, stats and
the lease order (priority, then ready time) across fresh tasks and the others; and tasks written
by the previous layout (a hash and a pending-zset entry) keep working."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from broker.errors import LeaseStale, TaskNotFound
from broker.ids import IdGenerator, entry_id, new_lease_id
from broker.models import NewTask, TaskRef, TaskState
from broker.queue import TaskQueue, TaskRequest
from broker.store.keys import QueueKeys
from broker.store.redis_store import RedisStore
from tests.store.conftest import Topology

Q = "fresh"
KEYS = QueueKeys(Q)


async def lease_ids(tasks: TaskQueue, n: int) -> list[str]:
    batch = await tasks.lease(Q, [(new_lease_id(), 60_000, "s", "") for _ in range(n)])
    return [lease.task.ref.task_id for lease in batch.leases]


async def node_client(topology: Topology) -> aioredis.Redis:
    """A plain client on the node that holds the queue's slot (any node for standalone)."""
    for url in topology.node_urls:
        client = aioredis.Redis.from_url(url)
        try:
            await client.exists(KEYS.fresh_priorities)
            return client
        except aioredis.ResponseError:  # MOVED: not this node's slot
            await client.aclose()
    raise AssertionError("no node holds the queue's slot")


async def test_a_fresh_task_has_no_key_of_its_own_and_reads_like_any_other(
    tasks: TaskQueue, topology: Topology
) -> None:
    request = TaskRequest(
        Q, "send", b"hello", headers={"k": "v"}, priority=3, max_attempts=7, lease_ms=5_000
    )
    [outcome] = await tasks.enqueue([request])
    client = await node_client(topology)
    async with client:
        local_id = outcome.task_id.rpartition(":")[2]
        assert not await client.exists(KEYS.task(local_id))
        assert await client.xlen(KEYS.fresh(3)) == 1
    task = await tasks.get(outcome.task_id)
    assert (task.state, task.type, task.payload, task.headers) == (
        TaskState.PENDING, "send", b"hello", {"k": "v"}
    )  # fmt: skip
    assert (task.priority, task.max_attempts, task.lease_ms, task.attempt) == (3, 7, 5_000, 0)
    assert task.create_ms > 0 and task.schedule_ms == task.create_ms
    [stats] = await tasks.stats([Q])
    assert (stats.pending, stats.oldest_ready_ms) == (1, task.create_ms)
    [leased] = (await tasks.lease(Q, [(new_lease_id(), 60_000, "s", "")])).leases
    assert (leased.task.ref.task_id, leased.task.payload) == (outcome.task_id, b"hello")
    assert leased.task.headers == {"k": "v"} and leased.task.attempt == 1
    assert (await tasks.get(outcome.task_id)).state == TaskState.LEASED


async def test_leases_follow_priority_then_ready_time_across_fresh_and_retried_tasks(
    tasks: TaskQueue,
) -> None:
    [retried, early] = [o.task_id for o in await tasks.enqueue([
        TaskRequest(Q, "send", b"r"), TaskRequest(Q, "send", b"e"),
    ])]  # fmt: skip
    [first] = (await tasks.lease(Q, [(new_lease_id(), 60_000, "s", "")])).leases
    assert first.task.ref.task_id == retried
    # Back to pending now, so after `early` (created before) and before `late` (after).
    await tasks.nack(retried, first.lease_id, "again", 0, False)
    [late] = [o.task_id for o in await tasks.enqueue([TaskRequest(Q, "send", b"l")])]
    [urgent] = [o.task_id for o in await tasks.enqueue([TaskRequest(Q, "send", b"u", priority=5)])]
    assert await lease_ids(tasks, 10) == [urgent, early, retried, late]
    assert (await tasks.stats([Q]))[0].pending == 0


async def test_a_fresh_task_cancelled_is_kept_as_cancelled_and_never_leased(
    tasks: TaskQueue,
) -> None:
    [doomed, kept] = [o.task_id for o in await tasks.enqueue([
        TaskRequest(Q, "send", b"d"), TaskRequest(Q, "send", b"k"),
    ])]  # fmt: skip
    task, revoked = await tasks.cancel(doomed)
    assert (task.state, revoked) == (TaskState.CANCELLED, None)
    assert (await tasks.get(doomed)).payload == b"d"
    assert (await tasks.stats([Q]))[0].pending == 1
    assert await lease_ids(tasks, 10) == [kept]


async def test_an_enqueue_call_sent_again_stores_its_fresh_tasks_once(
    store: RedisStore, tasks: TaskQueue
) -> None:
    new = NewTask(
        TaskRef(Q, IdGenerator().new()), "send", b"once", {}, 0, 3, None, 1000, 60_000,
        None, None, None, None,
    )  # fmt: skip
    for _ in range(2):  # the first reply was lost, the caller sends the same tasks again
        await store.enqueue(Q, [new], 60_000)
    assert (await tasks.stats([Q]))[0].pending == 1


async def test_ids_out_of_their_stream_s_order_are_stored_and_leased_all_the_same(
    store: RedisStore, tasks: TaskQueue
) -> None:
    # Two brokers' ids for one queue need not arrive in order: the later-arriving, smaller id
    # cannot go into the stream, so it gets a hash of its own.
    ids = IdGenerator()
    older, newer = ids.new(), ids.new()

    def new(local_id: str) -> NewTask:
        return NewTask(
            TaskRef(Q, local_id), "send", local_id.encode(), {}, 0, 3, None, 1000, 60_000,
            None, None, None, None,
        )  # fmt: skip

    await store.enqueue(Q, [new(newer)], 60_000)
    await store.enqueue(Q, [new(older)], 60_000)
    assert (await tasks.get(f"{Q}:{older}")).payload == older.encode()
    assert (await tasks.stats([Q]))[0].pending == 2
    assert sorted(await lease_ids(tasks, 10)) == sorted([f"{Q}:{newer}", f"{Q}:{older}"])


async def test_a_queue_whose_fresh_stream_emptied_is_forgotten(
    store: RedisStore, tasks: TaskQueue, topology: Topology
) -> None:
    [task_id] = [o.task_id for o in await tasks.enqueue([TaskRequest(Q, "send", b"x")])]
    [leased] = (await tasks.lease(Q, [(new_lease_id(), 60_000, "s", "")])).leases
    await store.forget_queue(Q)  # not yet: a task is leased
    await tasks.ack(task_id, leased.lease_id, b"")
    await store.trim_finished(Q, 0, 0, 100)
    assert await store.forget_queue(Q)
    client = await node_client(topology)
    async with client:
        assert not [k async for k in client.scan_iter(match=f"tb:{{{Q}}}:*")]


@pytest.mark.parametrize("topology", ["standalone"], indirect=True)
async def test_a_task_written_by_the_previous_layout_is_leased_read_and_cancelled(
    tasks: TaskQueue, topology: Topology
) -> None:
    # Before fresh streams, every task was a hash plus a pending-zset entry, scored
    # (1000 - priority) * 2^42 + ready ms.
    old, other = IdGenerator().new(), IdGenerator().new()
    client = aioredis.Redis.from_url(topology.url)
    async with client:
        for local_id in (old, other):
            await client.hset(KEYS.task(local_id), mapping={
                "type": "send", "payload": b"old", "pri": 0, "att": 0, "max": 3, "bo_i": 1000,
                "bo_m": 60_000, "ctime": 1, "state": int(TaskState.PENDING), "stime": 1,
            })  # fmt: skip
            await client.zadd(KEYS.pending, {local_id: 1000 * 2**42 + 1})
    [fresh] = [o.task_id for o in await tasks.enqueue([TaskRequest(Q, "send", b"new")])]
    assert (await tasks.get(f"{Q}:{old}")).payload == b"old"
    await tasks.cancel(f"{Q}:{other}")
    assert (await tasks.stats([Q]))[0].pending == 2
    assert await lease_ids(tasks, 10) == [f"{Q}:{old}", fresh]  # ready long before


@pytest.mark.parametrize("topology", ["standalone"], indirect=True)
async def test_a_fresh_entry_with_its_fields_in_another_order_is_leased_by_name(
    tasks: TaskQueue, topology: Topology
) -> None:
    # lease.lua reads an entry by position when it has enqueue.lua's order, and by name
    # otherwise (an entry another broker version wrote, with fields in another order).
    [by_position] = await tasks.enqueue([TaskRequest(Q, "send", b"plain", lease_ms=7_000)])
    await asyncio.sleep(0.002)  # a later ms: the stream takes only increasing entry ids
    moved = IdGenerator().new()
    client = aioredis.Redis.from_url(topology.url)
    async with client:
        await client.xadd(KEYS.fresh(0), id=entry_id(moved), fields={
            "type": "send", "id": moved, "hdr": '{"k": "v"}', "payload": b"moved",
            "lease_ms": 9_000, "max": 4, "bo_m": 900, "bo_i": 20,
        })  # fmt: skip
    leases = (await tasks.lease(Q, [(new_lease_id(), 60_000, "s", "") for _ in range(3)])).leases

    assert [lease.task.ref.task_id for lease in leases] == [by_position.task_id, f"{Q}:{moved}"]
    first, second = (lease.task for lease in leases)
    assert (first.payload, first.lease_ms, first.headers) == (b"plain", 7_000, {})
    assert (second.payload, second.lease_ms, second.headers) == (b"moved", 9_000, {"k": "v"})
    assert (second.max_attempts, second.initial_backoff_ms, second.max_backoff_ms) == (4, 20, 900)
    assert second == await tasks.get(f"{Q}:{moved}")


async def test_settling_a_fresh_task_is_stale_not_an_unknown_task(tasks: TaskQueue) -> None:
    [task_id] = [o.task_id for o in await tasks.enqueue([TaskRequest(Q, "send", b"x")])]
    with pytest.raises(LeaseStale):
        await tasks.ack(task_id, new_lease_id(), b"")
    with pytest.raises(TaskNotFound):
        await tasks.ack(f"{Q}:{IdGenerator().new()}", new_lease_id(), b"")


@pytest.mark.parametrize(
    "request_",
    [
        TaskRequest(Q, "plain", b"x"),
        TaskRequest(
            Q,
            "full",
            b"\x00payload",
            headers={"k": "v"},
            priority=-7,
            max_attempts=9,
            lease_ms=7_000,
            initial_backoff_ms=20,
            max_backoff_ms=900,
        ),
    ],
)
async def test_a_task_leased_from_its_fresh_stream_is_the_task_its_hash_reads_as(
    tasks: TaskQueue, request_: TaskRequest
) -> None:
    """lease.lua answers a fresh task's lease in a short form (FRESH_REPLY_FIELDS) and fills
    in the rest; what it fills in must be what the hash it writes holds."""
    [outcome] = await tasks.enqueue([request_])
    [lease] = (await tasks.lease(Q, [(new_lease_id(), 60_000, "s", "")])).leases

    stored = await tasks.get(outcome.task_id)  # decoded from the hash (HGETALL)

    assert lease.task == stored
    assert (lease.task.state, lease.task.attempt, lease.task.lease_id) == (
        TaskState.LEASED, 1, lease.lease_id
    )  # fmt: skip
