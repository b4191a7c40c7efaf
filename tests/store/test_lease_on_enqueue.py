"""A lease sent with an enqueue: when a stream of this broker waits on the queue, the enqueue's
write also leases for it (a second write on a Cluster), so the task is delivered without the
Pub/Sub wake and a lease call of the pump's own. No wake listener runs unless a test asks for
one (`listening`): only the enqueue itself can deliver."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from broker.config import Settings
from broker.dispatch import MAX_INLINE_LEASE, Dispatcher, Subscription
from broker.errors import IdempotencyConflict
from broker.loops.wake_listener import WakeListener
from broker.models import Lease, TaskState
from broker.queue import TaskQueue, TaskRequest
from broker.store.redis_store import RedisStore
from tests.store.conftest import Topology

QUEUE = "inline"


class Stream:
    """A subscription that records what it is given."""

    def __init__(self, dispatcher: Dispatcher, credits: int) -> None:
        self.got: list[Lease] = []
        self.credits = credits
        self.sub: Subscription = dispatcher.subscribe([QUEUE], 60_000, self._deliver)
        self.sub.add_credits(credits)  # the pump is queued for its first round at once
        self._pump = dispatcher._pumps[QUEUE]

    async def settled(self) -> None:
        """Waits for the pump's first round (new credits) to find the queue empty and give the
        credits back: while it holds them, an enqueue finds no stream to lease for."""
        deadline = time.monotonic() + 5
        while self._pump.queued or self._pump.running or self.sub.credits < self.credits:
            assert time.monotonic() < deadline, "the first lease round did not end"
            await asyncio.sleep(0.01)

    def _deliver(self, leases: list[Lease]) -> bool:
        self.got.extend(leases)
        return True

    async def wait_for(self, n: int, within_s: float = 3.0) -> None:
        deadline = time.monotonic() + within_s
        while len(self.got) < n:
            assert time.monotonic() < deadline, f"{len(self.got)} of {n} tasks delivered"
            await asyncio.sleep(0.01)


@pytest.fixture
async def dispatcher(tasks: TaskQueue) -> AsyncIterator[Dispatcher]:
    dispatcher = Dispatcher(tasks)
    yield dispatcher
    await dispatcher.stop()


async def _inline_on(tasks: TaskQueue, dispatcher: Dispatcher, credits: int) -> Stream:
    """Turns inline leases on (as the app does) and opens a stream, its first round done."""
    tasks.reserve_inline = dispatcher.reserve_inline
    stream = Stream(dispatcher, credits)
    await stream.settled()
    return stream


async def _script_calls(topology: Topology) -> int:
    """Script calls so far, over every node."""
    total = 0
    for client in topology.node_clients():
        stats = await client.info("commandstats")
        total += int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
        await client.aclose()
    return total


async def test_an_enqueue_reaches_a_waiting_stream_without_a_wake(
    tasks: TaskQueue, dispatcher: Dispatcher, topology: Topology
) -> None:
    stream = await _inline_on(tasks, dispatcher, credits=5)
    await tasks.enqueue([TaskRequest(QUEUE, "t", payload=b"first")])  # loads the scripts
    await stream.wait_for(1)
    await asyncio.sleep(0.1)
    calls = await _script_calls(topology)
    [outcome] = await tasks.enqueue([TaskRequest(QUEUE, "t", payload=b"x")])
    await stream.wait_for(2)
    lease = stream.got[1]
    assert lease.task.ref.task_id == outcome.task_id and lease.task.payload == b"x"
    assert stream.sub.credits == 3  # the one taken; the extra slot came back
    # Three scripts: the enqueue, the lease and the lease's due-index hint. The lease left a
    # slot unfilled, so the queue has nothing more: no lease round of the pump follows.
    await asyncio.sleep(0.3)
    assert await _script_calls(topology) - calls == 3
    state = await tasks.get(outcome.task_id)
    assert state.state is TaskState.LEASED and state.lease_id == lease.lease_id


async def test_without_a_waiting_stream_the_enqueue_leases_nothing(
    tasks: TaskQueue, dispatcher: Dispatcher
) -> None:
    stream = await _inline_on(tasks, dispatcher, credits=0)
    [outcome] = await tasks.enqueue([TaskRequest(QUEUE, "t")])
    delayed = await tasks.enqueue([TaskRequest(QUEUE, "t", delay_ms=60_000)])
    await asyncio.sleep(0.2)
    assert stream.got == []
    assert (await tasks.get(outcome.task_id)).state is TaskState.PENDING
    assert (await tasks.get(delayed[0].task_id)).state is TaskState.SCHEDULED


async def test_a_bulk_enqueue_is_left_to_the_pump(tasks: TaskQueue, dispatcher: Dispatcher) -> None:
    """Its tasks go in the pump's rounds, which do not hold up the producer's reply."""
    stream = await _inline_on(tasks, dispatcher, credits=100)
    await tasks.enqueue([TaskRequest(QUEUE, "t") for _ in range(MAX_INLINE_LEASE + 1)])
    await asyncio.sleep(0.2)
    assert stream.got == []  # no wake listener here: only a pump's round would take them
    await tasks.enqueue([TaskRequest(QUEUE, "t") for _ in range(MAX_INLINE_LEASE)])
    # Its lease fills the extra slot with the first call's tasks: the pump takes the rest.
    await stream.wait_for(2 * MAX_INLINE_LEASE + 1)


async def test_a_backlog_the_inline_lease_finds_is_leased_by_the_pump(
    tasks: TaskQueue, dispatcher: Dispatcher
) -> None:
    stream = Stream(dispatcher, credits=10)
    await stream.settled()
    # Stored unseen: no wake reaches this dispatcher, and inline leases are not yet on.
    await tasks.enqueue([TaskRequest(QUEUE, "t") for _ in range(5)])
    await asyncio.sleep(0.2)
    assert stream.got == []
    tasks.reserve_inline = dispatcher.reserve_inline
    await tasks.enqueue([TaskRequest(QUEUE, "t")])
    # The inline lease fills its extra slot, so the pump learns of the backlog and takes it.
    await stream.wait_for(6)
    assert len({le.task.ref.task_id for le in stream.got}) == 6


async def test_the_lease_is_handed_out_when_the_caller_gives_up_meanwhile(
    tasks: TaskQueue, dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = await _inline_on(tasks, dispatcher, credits=5)
    store = tasks._store
    real: Callable[..., Awaitable[Any]] = store.enqueue_and_lease
    caller: asyncio.Task[Any] | None = None

    async def give_up_meanwhile(*args: Any, **kwargs: Any) -> Any:
        assert caller is not None
        caller.cancel()  # the Enqueue's deadline passes while the write is in flight
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "enqueue_and_lease", give_up_meanwhile)
    caller = asyncio.create_task(tasks.enqueue([TaskRequest(QUEUE, "t")]))
    with pytest.raises(asyncio.CancelledError):
        await caller
    await stream.wait_for(1)
    state = await tasks.get(stream.got[0].task.ref.task_id)
    assert state.state is TaskState.LEASED and state.lease_id == stream.got[0].lease_id


async def test_a_refused_enqueue_still_hands_out_what_its_lease_took(
    tasks: TaskQueue, dispatcher: Dispatcher
) -> None:
    stream = Stream(dispatcher, credits=5)
    await stream.settled()
    [first] = await tasks.enqueue([TaskRequest(QUEUE, "t", b"a", idempotency_key="k")])
    await asyncio.sleep(0.2)
    assert stream.got == []  # stored unseen, as in the backlog test
    tasks.reserve_inline = dispatcher.reserve_inline
    with pytest.raises(IdempotencyConflict):
        await tasks.enqueue([TaskRequest(QUEUE, "t", b"b", idempotency_key="k")])
    # Nothing was stored, but the lease in the same write took the task stored before.
    await stream.wait_for(1)
    assert [le.task.ref.task_id for le in stream.got] == [first.task_id]
    assert (await tasks.get(first.task_id)).state is TaskState.LEASED


@pytest.fixture
async def listening(
    tasks: TaskQueue, dispatcher: Dispatcher, store: RedisStore
) -> AsyncIterator[WakeListener]:
    """The broker's wake listener, as the app runs it."""
    await store.ping()  # a Cluster client learns its nodes
    listener = WakeListener(tasks, dispatcher, revoke=lambda task_id, lease_id: None)
    listener.start()
    await asyncio.wait_for(listener.connected.wait(), 5)
    yield listener
    await listener.stop()


async def test_its_own_wake_costs_this_broker_no_lease_call(
    tasks: TaskQueue, dispatcher: Dispatcher, listening: WakeListener, topology: Topology
) -> None:
    stream = await _inline_on(tasks, dispatcher, credits=5)
    await tasks.enqueue([TaskRequest(QUEUE, "t")])  # loads the scripts
    await stream.wait_for(1)
    await asyncio.sleep(0.1)
    calls = await _script_calls(topology)
    await tasks.enqueue([TaskRequest(QUEUE, "t")])
    await stream.wait_for(2)
    await asyncio.sleep(0.3)  # the wake has come meanwhile: the echo before it let it pass
    assert await _script_calls(topology) - calls == 3


async def test_another_brokers_wake_still_reaches_the_pump(
    tasks: TaskQueue,
    dispatcher: Dispatcher,
    listening: WakeListener,
    store: RedisStore,
    settings: Settings,
) -> None:
    other = TaskQueue(store, settings)  # a replica with no stream of its own on the queue
    stream = await _inline_on(tasks, dispatcher, credits=10)
    for _ in range(3):  # echoes and other wakes interleaved
        await tasks.enqueue([TaskRequest(QUEUE, "t")])
        await other.enqueue([TaskRequest(QUEUE, "t")])
    await stream.wait_for(6)


async def test_an_enqueue_that_leases_survives_a_redis_that_lost_its_scripts(
    tasks: TaskQueue, dispatcher: Dispatcher, topology: Topology
) -> None:
    """After a restart Redis has none of the scripts: each of the write's three is loaded."""
    stream = await _inline_on(tasks, dispatcher, credits=5)
    for client in topology.node_clients():
        await client.script_flush()
        await client.aclose()
    [outcome] = await tasks.enqueue([TaskRequest(QUEUE, "t")])
    await stream.wait_for(1)
    assert stream.got[0].task.ref.task_id == outcome.task_id
