"""Large payloads are written ahead of their enqueue script (staged) and renamed into place by
it, and leased by reference (read by a plain HGET after the lease script): what users see is
the same as for small ones, on standalone Redis and on a Redis Cluster, and nothing staged
outlives the call (a staged payload that is not used expires)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest

from broker.config import Settings
from broker.errors import IdempotencyConflict, StoreUnavailable
from broker.ids import new_lease_id
from broker.models import NewTask, Task, TaskState
from broker.queue import TaskQueue, TaskRequest
from broker.store.keys import QueueKeys
from broker.store.redis_store import (
    FETCH_PAYLOAD_BYTES,
    LEASE_REPLY_BYTES,
    STAGE_PAYLOAD_BYTES,
    STAGE_TTL_MS,
    RedisStore,
)
from tests.store.conftest import Topology

Q = "uploads"
BIG = STAGE_PAYLOAD_BYTES + 1


async def stage_keys(topology: Topology) -> dict[bytes, int]:
    """Every stage key on every node, with its remaining time to live (ms; -1: none)."""
    found: dict[bytes, int] = {}
    for client in topology.node_clients():
        async with client:
            async for key in client.scan_iter(match=QueueKeys(Q).stage_prefix + "*"):
                found[key] = await client.pttl(key)
    return found


async def test_large_and_small_payloads_are_stored_whole_and_no_stage_key_is_left(
    tasks: TaskQueue, topology: Topology
) -> None:
    payloads = [os.urandom(BIG), b"small", os.urandom(3 * BIG), os.urandom(STAGE_PAYLOAD_BYTES)]
    outcomes = await tasks.enqueue([TaskRequest(Q, "resize", p) for p in payloads])
    for outcome, payload in zip(outcomes, payloads, strict=True):
        task = await tasks.get(outcome.task_id)
        assert (task.state, task.payload) == (TaskState.PENDING, payload)
    batch = await tasks.lease(Q, [(new_lease_id(), 10_000, "s", "") for _ in payloads])
    assert sorted(lease.task.payload for lease in batch.leases) == sorted(payloads)
    assert await stage_keys(topology) == {}


async def test_a_duplicate_by_idempotency_key_drops_its_staged_payload(
    tasks: TaskQueue, topology: Topology
) -> None:
    request = TaskRequest(Q, "resize", os.urandom(BIG), idempotency_key="photo-1")
    [first] = await tasks.enqueue([request])
    [again] = await tasks.enqueue([request])
    assert (again.task_id, again.duplicate) == (first.task_id, True)
    assert (await tasks.stats([Q]))[0].pending == 1
    assert await stage_keys(topology) == {}


async def test_a_call_refused_for_a_conflict_stores_nothing_and_its_stage_keys_expire(
    tasks: TaskQueue, topology: Topology
) -> None:
    await tasks.enqueue([TaskRequest(Q, "resize", os.urandom(BIG), idempotency_key="photo-1")])
    with pytest.raises(IdempotencyConflict):
        await tasks.enqueue([TaskRequest(Q, "resize", os.urandom(BIG), idempotency_key="photo-1")])
    assert (await tasks.stats([Q]))[0].pending == 1
    left = await stage_keys(topology)
    assert len(left) == 1
    assert all(0 < ttl <= STAGE_TTL_MS for ttl in left.values()), left


class LosingStore(RedisStore):
    """A store whose first `losses` stagings write nothing, as when Redis restarted empty (or
    failed over) between a payload's staging and its script."""

    def __init__(self, store: RedisStore, losses: int) -> None:
        super().__init__(store.client)
        self.losses = losses
        self.stagings = 0

    async def _stage(self, queue: str, tasks: Sequence[NewTask]) -> None:
        self.stagings += 1
        if self.stagings > self.losses:
            await super()._stage(queue, tasks)


async def test_a_staged_payload_redis_lost_is_written_again(
    store: RedisStore, settings: Settings
) -> None:
    losing = LosingStore(store, losses=1)
    tasks = TaskQueue(losing, settings)
    payload = os.urandom(BIG)
    [outcome] = await tasks.enqueue([TaskRequest(Q, "resize", payload)])
    assert (await tasks.get(outcome.task_id)).payload == payload
    assert losing.stagings == 2


async def test_staged_payloads_lost_twice_fail_the_call_and_store_nothing(
    store: RedisStore, settings: Settings
) -> None:
    tasks = TaskQueue(LosingStore(store, losses=2), settings)
    requests = [TaskRequest(Q, "resize", os.urandom(BIG)), TaskRequest(Q, "note", b"small")]
    with pytest.raises(StoreUnavailable, match="nothing was stored"):
        await tasks.enqueue(requests)
    stats = (await tasks.stats([Q]))[0]
    assert (stats.pending, stats.scheduled) == (0, 0)


async def test_a_lease_call_stops_at_its_reply_budget_and_says_the_rest_is_due_now(
    tasks: TaskQueue,
) -> None:
    # Redis copies a reply's bytes while every other client waits: megabyte tasks go one per
    # call, smaller ones until the reply holds LEASE_REPLY_BYTES.
    third = LEASE_REPLY_BYTES // 3 + 1
    payloads = [os.urandom(LEASE_REPLY_BYTES + 1), os.urandom(LEASE_REPLY_BYTES + 1)]
    payloads += [os.urandom(third) for _ in range(4)]
    await tasks.enqueue([TaskRequest(Q, "resize", p) for p in payloads])
    slots = [(new_lease_id(), 10_000, "s", "") for _ in payloads]
    sizes, dues = [], []
    while True:
        batch = await tasks.lease(Q, slots)
        if not batch.leases:
            break
        sizes.append([len(lease.task.payload) for lease in batch.leases])
        dues.append(batch.next_due_ms == batch.now_ms)
    big = LEASE_REPLY_BYTES + 1
    assert sizes == [[big], [big], [third] * 3, [third]]
    assert dues == [True, True, True, False]  # the last call took all that was left


async def test_large_payloads_are_leased_by_reference_and_read_whole(
    tasks: TaskQueue, store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # lease.lua leaves out a payload over FETCH_PAYLOAD_BYTES (Redis spent ~1.7 ms passing a
    # 1 MiB payload through Lua, ~0.07 ms on a plain HGET); the store reads it by HGET.
    read_by_reference: list[int] = []
    read_payloads = store._read_payloads

    async def spy(found: list[Task], positions: Sequence[int]) -> frozenset[int]:
        read_by_reference.extend(len(found[i].payload) for i in positions)  # before the read
        return await read_payloads(found, positions)

    monkeypatch.setattr(store, "_read_payloads", spy)
    payloads = [os.urandom(FETCH_PAYLOAD_BYTES + 1), b"small", os.urandom(FETCH_PAYLOAD_BYTES)]
    outcomes = await tasks.enqueue([TaskRequest(Q, "resize", p, priority=1) for p in payloads])
    by_id = {o.task_id: p for o, p in zip(outcomes, payloads, strict=True)}
    batch = await tasks.lease(Q, [(new_lease_id(), 10_000, "s", "") for _ in payloads])
    assert {lease.task.ref.task_id: lease.task.payload for lease in batch.leases} == by_id
    assert read_by_reference == [0]  # the one over the bound came without its bytes
    assert batch.gone == frozenset()


async def test_a_task_deleted_before_its_payload_is_read_is_not_delivered(
    tasks: TaskQueue, store: RedisStore, topology: Topology
) -> None:
    payloads = [os.urandom(FETCH_PAYLOAD_BYTES + 1), os.urandom(FETCH_PAYLOAD_BYTES + 2)]
    await tasks.enqueue([TaskRequest(Q, "resize", p) for p in payloads])
    batch = await tasks.lease(Q, [(new_lease_id(), 10_000, "s", "") for _ in payloads])
    leased = [lease.task for lease in batch.leases]
    # The second finished and was trimmed between lease.lua and the read of its payload.
    async with topology.client() as client:
        await client.delete(QueueKeys(Q).task_prefix + leased[1].ref.local_id)
    found = [task._replace(payload=b"") for task in leased]
    assert await store._read_payloads(found, [0, 1]) == frozenset({1})
    assert found[0].payload == leased[0].payload
