"""Redis faults under load (RELIABILITY.md 1.5-1.6 and 7): kill -9 and restart with AOF
fsync always, SIGSTOP/SIGCONT, restarts with delayed tasks waiting, and a Redis that is full.

Every test owns its redis-server (killing it harms nobody else) and an in-process broker, and
checks the section 7.2 oracles that apply: no acknowledged enqueue lost, nothing unexpected
delivered, every failure a clear status code, and recovery without restarting anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskbroker import (
    Client,
    NewTask,
    TaskContext,
    TaskState,
    UnavailableError,
    Worker,
    handler,
)
from taskbroker.v1 import broker_service_pb2 as bs
from tests.conftest import TEST_SETTINGS, RunningBroker, start_broker
from tests.support.redis_server import RedisServer
from tests.support.tasks import get, spec

if TYPE_CHECKING:
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub

#: Reconnect fast, so a worker does not wait out gRPC's 1 s backoff after a broker restart.
FAST_RECONNECT: Final = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 50),
]
#: What a call may answer while Redis is unreachable or frozen.
TRANSIENT: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    """A Redis this test may kill: AOF fsync always, so an acknowledged write is on disk."""
    with RedisServer(appendonly=True, appendfsync="always") as server:
        yield server


@pytest.fixture
def plain_redis() -> Iterator[RedisServer]:
    """A Redis this test may pause."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def small_redis() -> Iterator[RedisServer]:
    """A Redis that fills up fast: 4 MiB, noeviction (the only policy the broker accepts)."""
    with RedisServer(maxmemory_policy="noeviction", extra_args=["--maxmemory", "4mb"]) as server:
        yield server


# --- helpers ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def broker_on(redis: RedisServer, **overrides: Any) -> AsyncIterator[RunningBroker]:
    """An in-process broker on `redis`, stopped on the way out (also when a check fails)."""
    running = await start_broker(replace(TEST_SETTINGS, redis_url=redis.url), **overrides)
    try:
        yield running
    finally:
        await running.close()  # a repeat of an earlier close is harmless


@contextlib.asynccontextmanager
async def background(*jobs: Coroutine[Any, Any, None]) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Runs `jobs` as tasks; any still running on the way out are cancelled."""
    tasks = [asyncio.create_task(job) for job in jobs]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_for(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    """Polls `condition` until it is true, or fails the test."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.05)


async def drain(client: Client, task_ids: list[str], timeout_s: float) -> dict[str, TaskState]:
    """Waits until every task has finished; returns each one's final state. Reads that fail
    UNAVAILABLE (the client's channel reconnecting, Redis still loading) are retried."""
    deadline = time.monotonic() + timeout_s
    states: dict[str, TaskState] = {}
    waiting = list(task_ids)
    while waiting:
        if time.monotonic() > deadline:
            pytest.fail(f"{len(waiting)} tasks unfinished after {timeout_s:g}s: {waiting[:5]}")
        try:
            task = await client.get_task(waiting[0])
        except UnavailableError:
            await asyncio.sleep(0.05)
            continue
        if task.state.finished:
            states[waiting.pop(0)] = task.state
        else:
            await asyncio.sleep(0.05)
    return states


async def serving(running: RunningBroker) -> bool:
    stub = health_pb2_grpc.HealthStub(running.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def wait_for_serving(running: RunningBroker, timeout_s: float = 5.0) -> None:
    """Waits until the broker's health (which follows Redis, checked every second) is SERVING."""
    deadline = time.monotonic() + timeout_s
    while not await serving(running):
        assert time.monotonic() < deadline, "health did not return to SERVING"
        await asyncio.sleep(0.1)


@dataclass
class Ledger:
    """What the producers were told: the id Enqueue returned per idempotency key, and how many
    calls failed UNAVAILABLE after the SDK's retries."""

    id_by_key: dict[str, str] = field(default_factory=dict)
    unavailable: int = 0

    @property
    def acked(self) -> int:
        return len(self.id_by_key)

    def key_of(self) -> dict[str, str]:
        return {task_id: key for key, task_id in self.id_by_key.items()}


async def produce(
    client: Client, name: str, queue: str, ledger: Ledger, stop: asyncio.Event
) -> None:
    """Enqueues keyed tasks one after another until `stop`; an UNAVAILABLE (after the SDK's own
    retries) is retried with the same key, so every key ends with the id the broker stored."""
    deadline = time.monotonic() + 40
    i = 0
    while not stop.is_set():
        key = f"{name}-{i}"
        while True:
            assert time.monotonic() < deadline, f"{key} never acknowledged"
            try:
                task_id = await client.enqueue(queue, "job", key.encode(), idempotency_key=key)
            except UnavailableError:
                ledger.unavailable += 1
                await asyncio.sleep(0.05)
                continue
            ledger.id_by_key[key] = task_id
            break
        i += 1
        await asyncio.sleep(0.005)


# --- fault 6: kill -9 and restart of Redis under load ---------------------------------------


async def test_fault6_redis_kill_loses_no_acknowledged_enqueue_and_all_recover_by_themselves(
    aof_redis: RedisServer,
) -> None:
    queue = "fault6"
    concurrency = 8
    executed: Counter[str] = Counter()
    payloads: dict[str, bytes] = {}

    @handler("job")
    async def job(ctx: TaskContext, payload: bytes) -> None:
        executed[ctx.task_id] += 1
        payloads[ctx.task_id] = payload

    ledger = Ledger()
    stop = asyncio.Event()
    async with (
        broker_on(aof_redis) as running,
        Client(running.target, timeout=5, options=FAST_RECONNECT) as client,
    ):
        worker = Worker(
            client,
            queues=[queue],
            handlers=[job],
            concurrency=concurrency,
            # A lease granted just before the kill whose reply was lost comes back this soon.
            lease_duration=timedelta(seconds=2),
            worker_id="fault6-worker",
            shutdown_grace=timedelta(seconds=1),
        )
        async with (
            worker,
            background(*(produce(client, f"p{n}", queue, ledger, stop) for n in range(4))) as jobs,
        ):
            await wait_for(lambda: ledger.acked >= 40, "enqueues before the kill", 10)

            aof_redis.kill()
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await running.stub.Enqueue(
                    bs.EnqueueRequest(tasks=[spec(queue="fault6-probe")]), timeout=2
                )
            took = time.monotonic() - started
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
            assert took < 2.5, f"an Enqueue during the outage took {took:.2f}s"
            assert "Traceback" not in (err.value.details() or "")

            # The outage outlasts the SDK's own retries (at most 1.75 s of backoff), so producers
            # see UNAVAILABLE and retry with the same key; the worker keeps reconnecting.
            await asyncio.sleep(3.0)
            assert ledger.unavailable > 0
            acked_at_restart = ledger.acked
            aof_redis.start()  # same port and data dir: the AOF is replayed
            await wait_for(
                lambda: ledger.acked >= acked_at_restart + 40, "enqueues after the restart", 15
            )
            stop.set()
            await asyncio.gather(*jobs)

            key_of = ledger.key_of()
            states = await drain(client, list(key_of), timeout_s=20)

        # lost = 0: every acknowledged id succeeded.
        assert len(key_of) == ledger.acked, "two keys were given the same id"
        assert {t: s for t, s in states.items() if s is not TaskState.SUCCEEDED} == {}
        assert set(executed) == set(key_of), "ran a task never acknowledged, or missed one"
        assert all(payloads[t] == key.encode() for t, key in key_of.items())
        # Duplicates only from leases in flight at the kill: at most the worker's credits.
        duplicates = sum(executed.values()) - len(executed)
        assert duplicates <= concurrency, f"{duplicates} redeliveries"
        assert worker.processed == sum(executed.values())
        # The idempotency keys survived the kill too: repeats return the stored ids.
        repeats = await client.enqueue_many(
            NewTask(queue, "job", key.encode(), idempotency_key=key) for key in key_of.values()
        )
        assert all(r.duplicate for r in repeats)
        assert [r.task_id for r in repeats] == list(key_of)
        await wait_for_serving(running)


# --- fault 7: Redis frozen with SIGSTOP ---------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One Enqueue call: when it ran, what it sent, and what it was told."""

    started: float
    ended: float
    payload: bytes
    code: grpc.StatusCode
    task_id: str = ""


async def call_enqueue(stub: BrokerServiceAsyncStub, payload: bytes, timeout_s: float) -> Call:
    started = time.monotonic()
    request = bs.EnqueueRequest(tasks=[spec(queue="fault7", payload=payload)])
    try:
        response = await stub.Enqueue(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        return Call(started, time.monotonic(), payload, exc.code())
    (result,) = response.results
    return Call(started, time.monotonic(), payload, grpc.StatusCode.OK, result.task_id)


async def test_fault7_paused_redis_never_gets_an_ok_for_a_write_that_did_not_happen(
    plain_redis: RedisServer,
) -> None:
    timeout_s = 3.0
    calls: list[Call] = []
    stop = asyncio.Event()

    async def producer(stub: BrokerServiceAsyncStub, name: str) -> None:
        i = 0
        while not stop.is_set():
            calls.append(await call_enqueue(stub, f"{name}-{i}".encode(), timeout_s))
            i += 1
            await asyncio.sleep(0.01)

    async with broker_on(plain_redis, redis_timeout_s=1.0) as running:
        async with background(*(producer(running.stub, f"p{n}") for n in range(4))) as jobs:
            await wait_for(lambda: len(calls) >= 20, "enqueues before the pause", 10)
            plain_redis.pause()
            paused_at = time.monotonic()
            try:
                await asyncio.sleep(3.0)
            finally:
                plain_redis.resume()
            resumed_at = time.monotonic()
            await wait_for(
                lambda: any(c.started > resumed_at and c.code == grpc.StatusCode.OK for c in calls),
                "an OK enqueue after SIGCONT",
                10,
            )
            stop.set()
            await asyncio.gather(*jobs)

        codes = Counter(c.code for c in calls)
        assert set(codes) <= TRANSIENT | {grpc.StatusCode.OK}, codes
        during = [c for c in calls if c.started < resumed_at and c.ended > paused_at]
        assert any(c.code in TRANSIENT for c in during), "no call noticed the pause"
        longest = max(c.ended - c.started for c in calls)
        assert longest < timeout_s + 0.5, f"a call outlived its deadline: {longest:.2f}s"

        ok = [c for c in calls if c.code == grpc.StatusCode.OK]
        assert len({c.task_id for c in ok}) == len(ok), "two calls were given the same id"
        for c in ok:  # every OK is a write that happened, with what that call sent
            task = await get(running.stub, c.task_id)
            assert task.payload == c.payload, c
        # A failed call's outcome is unknown (Redis may run a script it had buffered once it is
        # resumed), but nothing else may appear.
        (stats,) = (await running.stub.Stats(bs.StatsRequest(queues=["fault7"]))).queues
        failed = len(calls) - len(ok)
        assert len(ok) <= stats.pending <= len(ok) + failed, (stats.pending, len(ok), failed)
        await wait_for_serving(running)


# --- fault 11: delayed tasks across a broker restart and a Redis restart --------------------


async def test_fault11_delayed_tasks_survive_broker_and_redis_restarts_and_run_once_on_time(
    aof_redis: RedisServer,
) -> None:
    queue = "fault11"
    starts: defaultdict[str, list[float]] = defaultdict(list)

    @handler("timed")
    async def timed(ctx: TaskContext, payload: bytes) -> None:
        starts[ctx.task_id].append(time.time())

    async with broker_on(aof_redis) as first:
        port = first.broker.port
        async with Client(f"127.0.0.1:{port}", options=FAST_RECONNECT) as client:
            results = await client.enqueue_many(
                NewTask(
                    queue,
                    "timed",
                    idempotency_key=f"delayed-{i}",
                    delay=timedelta(milliseconds=2500 + 40 * i),  # 2.5 s to 4.46 s
                )
                for i in range(50)
            )
            ids = [r.task_id for r in results]
            due: dict[str, float] = {}
            for task_id in ids:
                task = await client.get_task(task_id)
                assert task.state is TaskState.SCHEDULED and task.schedule_time is not None
                due[task_id] = task.schedule_time.timestamp()

            worker = Worker(
                client,
                queues=[queue],
                handlers=[timed],
                concurrency=16,
                worker_id="fault11-worker",
                shutdown_grace=timedelta(seconds=1),
            )
            async with worker:
                sessions = first.broker.registry.sessions
                await wait_for(lambda: len(sessions) > 0, "the worker's lease stream", 5)
                await first.close()  # graceful stop: the worker is told to drain, reconnects
                async with broker_on(aof_redis, listen=f"127.0.0.1:{port}"):
                    aof_redis.kill()
                    aof_redis.start()
                    restarted_at = time.time()
                    assert restarted_at < min(due.values()), "the restarts outlasted the delays"
                    assert not starts, "a delayed task ran early"
                    states = await drain(client, ids, timeout_s=20)

    assert {t: s for t, s in states.items() if s is not TaskState.SUCCEEDED} == {}
    assert {t: len(s) for t, s in starts.items() if len(s) != 1} == {}, "a task ran twice"
    assert set(starts) == set(ids)
    early = {t: due[t] - s[0] for t, s in starts.items() if s[0] < due[t]}
    assert early == {}, f"ran before schedule_time (seconds early): {early}"


# --- fault 13: Redis full (maxmemory, noeviction) ------------------------------------------

#: 4 tasks of 32 KiB per call: a 4 MiB Redis is full after a few dozen calls.
FILL_PAYLOAD_BYTES: Final = 32 * 1024
FILL_TASKS_PER_CALL: Final = 4


async def fill(stub: BrokerServiceAsyncStub) -> tuple[dict[str, bytes], grpc.aio.AioRpcError]:
    """Enqueues until Redis refuses. Returns the acknowledged tasks and the refusal."""
    acked: dict[str, bytes] = {}
    for n in range(400):  # 50 MiB: far beyond 4 MiB, so the loop always ends in a refusal
        payloads = [
            bytes([(n * FILL_TASKS_PER_CALL + k) % 251]) * FILL_PAYLOAD_BYTES
            for k in range(FILL_TASKS_PER_CALL)
        ]
        request = bs.EnqueueRequest(tasks=[spec(queue="fault13", payload=p) for p in payloads])
        try:
            response = await stub.Enqueue(request, timeout=5)
        except grpc.aio.AioRpcError as exc:
            return acked, exc
        for result, payload in zip(response.results, payloads, strict=True):
            acked[result.task_id] = payload
    pytest.fail("a 4 MiB Redis took 50 MiB of tasks")


async def test_fault13_full_redis_loses_nothing_stored_and_accepts_again_once_there_is_room(
    small_redis: RedisServer,
) -> None:
    @handler("send")
    async def send(ctx: TaskContext, payload: bytes) -> None:
        pass

    async with broker_on(small_redis) as running:
        acked, _ = await fill(running.stub)
        assert len(acked) >= 8, "Redis refused before storing anything"

        # Nothing stored is lost, and nothing of the refused call was stored.
        for task_id, payload in acked.items():
            assert (await get(running.stub, task_id)).payload == payload
        (stats,) = (await running.stub.Stats(bs.StatsRequest(queues=["fault13"]))).queues
        assert stats.enqueued_total == stats.pending == len(acked)

        redis_client = small_redis.client()
        try:
            redis_client.config_set("maxmemory", 0)  # room is made
        finally:
            redis_client.close()
        request = bs.EnqueueRequest(tasks=[spec(queue="fault13")])
        (new,) = (await running.stub.Enqueue(request, timeout=5)).results
        assert (await get(running.stub, new.task_id)).payload == b"{}"

        async with Client(running.target) as client:  # and every stored task still runs
            worker = Worker(client, queues=["fault13"], handlers=[send])
            # 2 MiB of payloads: a generous idle window, so a slow CI machine is not "idle".
            processed = await worker.run_until_idle(idle_for=timedelta(seconds=2))
            assert processed == len(acked) + 1
            states = await drain(client, [*acked, new.task_id], timeout_s=10)
        assert set(states.values()) == {TaskState.SUCCEEDED}


async def test_fault13_full_redis_answers_resource_exhausted_with_a_clear_message(
    small_redis: RedisServer,
) -> None:
    async with broker_on(small_redis) as running:
        _, refusal = await fill(running.stub)
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal
        assert "out of memory" in (refusal.details() or ""), refusal.details()
