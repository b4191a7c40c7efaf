"""Network faults (RELIABILITY.md 7): a FaultProxy between the broker and Redis, or between a
worker and the broker.

* Fault 7 (blackhole): the broker's link to Redis forwards nothing for a while. No Enqueue may
  answer OK for a write that did not happen, failures are UNAVAILABLE or DEADLINE_EXCEEDED, and
  the broker serves again by itself once the link heals.
* Fault 8: a worker is partitioned from the broker while it holds tasks. Its leases run out,
  another worker completes the tasks, and once the partitioned worker is back its late acks are
  refused as stale. The broker's keepalive (ping every 30 s, 10 s timeout) and the SDK's (20 s,
  10 s) would notice the dead link only after about 30-40 s, too slow for this tier, so the test
  ends the partition with `FaultProxy.reset()` (RST on both sides): the broker sees the stream
  break, the worker reconnects.
* Fault 9: a slow network (100-300 ms each way) between workers and the broker. Handlers that
  run 2-3 s on 1 s leases keep their leases through extension: nothing still being worked on is
  delivered again.

Workers are real processes (tests.support.worker_process) recording a history; every test runs
the checker of tests.support.history on it after the queue is drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from broker.config import Settings
from taskbroker import Client, TaskContext, TaskState, Worker, handler
from taskbroker.v1 import broker_service_pb2 as bs
from tests.conftest import RunningBroker, start_broker
from tests.faults.harness import Harness
from tests.faults.observe import (
    QUEUE,
    deliveries,
    eventually,
    final_tasks,
    outcome,
    queue_stats,
    settlements,
    stale_worker_changed_nothing,
    until_stats,
)
from tests.support.fault_proxy import FaultProxy
from tests.support.redis_server import RedisServer
from tests.support.tasks import get, spec

if TYPE_CHECKING:
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub

LOOPBACK: Final = "127.0.0.1"
#: What a call may answer while Redis cannot be reached.
TRANSIENT: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def harness(running: RunningBroker, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(running.target, tmp_path)
    yield harness
    harness.close()


@pytest.fixture
async def client(running: RunningBroker) -> AsyncIterator[Client]:
    async with Client(running.target) as client:
        yield client


@pytest.fixture
async def broker_proxy(running: RunningBroker) -> AsyncIterator[FaultProxy]:
    """A FaultProxy in front of the in-process broker, for workers to connect through."""
    async with FaultProxy(seed=8) as proxy:
        await proxy.start(LOOPBACK, running.broker.port)
        yield proxy


async def serving(stub: health_pb2_grpc.HealthStub) -> bool:
    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


# --- fault 7: the broker's link to Redis blackholed -----------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """One Enqueue call: when it ran, what it sent, and what it was told."""

    started: float
    ended: float
    payload: bytes
    code: grpc.StatusCode
    task_id: str = ""
    #: The ErrorInfo reason of a failed call ("" when the status carries none).
    reason: str = ""


async def call_enqueue(stub: BrokerServiceAsyncStub, payload: bytes, timeout_s: float) -> Call:
    started = time.monotonic()
    request = bs.EnqueueRequest(tasks=[spec(queue=QUEUE, type_="job", payload=payload)])
    try:
        response = await stub.Enqueue(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        return Call(started, time.monotonic(), payload, exc.code(), reason=_reason(exc))
    (result,) = response.results
    return Call(started, time.monotonic(), payload, grpc.StatusCode.OK, result.task_id)


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


@contextlib.asynccontextmanager
async def background(*jobs: Awaitable[None]) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Runs `jobs` as tasks; any still running on the way out are cancelled."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def broker_behind(proxy: FaultProxy, settings: Settings) -> AsyncIterator[RunningBroker]:
    """An in-process broker whose Redis URL is the proxy (redis_timeout_s 1 s)."""
    running = await start_broker(
        settings, redis_url=f"redis://{proxy.address}/0", redis_timeout_s=1.0
    )
    try:
        yield running
    finally:
        await running.close()


#: A failing call takes about 2 s (a 1 s socket timeout, then redis-py's one retry), so calls
#: that start after the cut also end inside it.
BLACKHOLE_S: Final = 5.0
CALL_TIMEOUT_S: Final = 3.0


async def test_fault7_blackholed_redis_link_never_answers_ok_for_a_write_that_did_not_happen(
    settings: Settings, redis_server: RedisServer
) -> None:
    calls: list[Call] = []
    stop = asyncio.Event()

    async def producer(stub: BrokerServiceAsyncStub, name: str) -> None:
        i = 0
        while not stop.is_set():
            calls.append(await call_enqueue(stub, f"{name}-{i}".encode(), CALL_TIMEOUT_S))
            i += 1
            await asyncio.sleep(0.01)

    def ok_after(at: float) -> bool:
        return any(c.started > at and c.code == grpc.StatusCode.OK for c in calls)

    async with FaultProxy(seed=7) as proxy:
        await proxy.start(LOOPBACK, redis_server.port)
        async with broker_behind(proxy, settings) as running:
            health = health_pb2_grpc.HealthStub(running.channel)
            async with background(*(producer(running.stub, f"p{n}") for n in range(4))) as jobs:
                await eventually(lambda: len(calls) >= 20, 10, "enqueues before the cut")
                proxy.blackhole()
                cut_at = time.monotonic()

                async def not_serving() -> bool:
                    return not await serving(health)

                # The broker notices by itself, while still cut off: its health check pings
                # Redis every second.
                await eventually(not_serving, BLACKHOLE_S - 0.5, "health NOT_SERVING")
                await asyncio.sleep(max(0.0, cut_at + BLACKHOLE_S - time.monotonic()))
                proxy.pass_through()
                healed_at = time.monotonic()
                await eventually(lambda: ok_after(healed_at), 10, "an OK after healing")
                await eventually(lambda: serving(health), 5, "health SERVING again")
                stop.set()
                await asyncio.gather(*jobs)

            codes = Counter(c.code for c in calls)
            assert set(codes) <= TRANSIENT | {grpc.StatusCode.OK}, codes
            # Each failure says why: the broker's ErrorInfo, or (a deadline that ran out in the
            # client) none.
            reasons = Counter((c.code.name, c.reason) for c in calls if c.code in TRANSIENT)
            assert set(reasons) <= {
                ("UNAVAILABLE", "STORE_UNAVAILABLE"),
                ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"),
                ("DEADLINE_EXCEEDED", ""),
            }, reasons
            during = [c for c in calls if c.started < healed_at and c.ended > cut_at]
            assert any(c.code in TRANSIENT for c in during), "no call noticed the blackhole"
            # A call that ran entirely inside the blackhole cannot have written anything.
            inside = [c for c in calls if c.started > cut_at and c.ended < healed_at]
            assert inside, "no call ran inside the blackhole"
            assert [c for c in inside if c.code == grpc.StatusCode.OK] == []
            longest = max(c.ended - c.started for c in calls)
            assert longest < CALL_TIMEOUT_S + 0.5, f"a call outlived its deadline: {longest:.2f}s"

            # Every OK is a write that happened, with what that call sent.
            ok = [c for c in calls if c.code == grpc.StatusCode.OK]
            assert len({c.task_id for c in ok}) == len(ok), "two calls were given the same id"
            for c in ok:
                task = await get(running.stub, c.task_id)
                assert task.payload == c.payload, c
            # A failed call's outcome is unknown (its script may have run before the cut, with
            # the reply lost), but nothing else may appear.
            (stats,) = (await running.stub.Stats(bs.StatsRequest(queues=[QUEUE]))).queues
            failed = len(calls) - len(ok)
            assert len(ok) <= stats.pending <= len(ok) + failed, (stats.pending, len(ok), failed)

            # And the broker is whole again: every acknowledged task is leased and run.
            ran: Counter[str] = Counter()

            @handler("job")
            async def job(ctx: TaskContext, payload: bytes) -> None:
                ran[ctx.task_id] += 1

            async with Client(running.target) as client:
                worker = Worker(client, queues=[QUEUE], handlers=[job], concurrency=32)
                await asyncio.wait_for(worker.run_until_idle(), 20)
                tasks = await final_tasks(client, [c.task_id for c in ok])
            assert {t.state for t in tasks.values()} == {TaskState.SUCCEEDED}
            assert {c.task_id for c in ok} <= set(ran)
            assert sum(ran.values()) == len(ran) == stats.pending, "a task ran twice"


# --- fault 8: a worker partitioned from the broker --------------------------------------------

PARTITION_TASKS: Final = 16
SHORT_LEASE: Final = timedelta(seconds=1)
#: Fault 9's lease: still shorter than its 2 s and 3 s tasks, so they live by extension, with
#: room for a 600 ms round trip on a loaded CI machine (extensions go at half the remaining).
SLOW_NETWORK_LEASE: Final = timedelta(milliseconds=1500)
#: The partitioned worker's handlers outlast its leases, and finish while it is still cut off.
PARTITIONED_HANDLER: Final = timedelta(seconds=2)


async def test_fault8_partitioned_worker_loses_its_leases_and_its_late_acks_are_fenced(
    running: RunningBroker, client: Client, harness: Harness, broker_proxy: FaultProxy
) -> None:
    ids = await harness.enqueue(client, PARTITION_TASKS)
    cut_off = harness.start(
        "cut-off",
        {"job": "sleep"},
        sleep=PARTITIONED_HANDLER,
        lease=SHORT_LEASE,
        concurrency=PARTITION_TASKS,
        target=broker_proxy.address,
    )
    delivered = await deliveries(cut_off, PARTITION_TASKS)
    (stream,) = running.broker.registry.sessions  # the cut-off worker's Lease stream

    broker_proxy.blackhole()  # no extensions get through: the leases run out and are reclaimed
    rescuer = harness.start(
        "rescuer", {"job": "ok"}, lease=SHORT_LEASE, concurrency=PARTITION_TASKS
    )
    await until_stats(
        client, lambda s: s.succeeded_total == PARTITION_TASKS, 15, "tasks done by the rescuer"
    )
    # The broker has not noticed the partition by itself (its keepalive needs 30-40 s).
    assert not stream.closed and stream in running.broker.registry.sessions
    # Let the cut-off worker's handlers finish: their acks queue up behind the partition.
    last_start_s = max(d.at_ns for d in delivered) / 1e9
    await asyncio.sleep(
        max(0.0, last_start_s + PARTITIONED_HANDLER.total_seconds() + 0.3 - _now_s())
    )
    assert settlements(cut_off) == [], "an ack got through the blackhole"

    broker_proxy.reset()  # the partition ends with both sides' connections reset
    # The broker sees its stream break; the worker reconnects and resends its acks.
    await eventually(lambda: stream.closed, 5, "the broker closing the broken stream")

    report = await stale_worker_changed_nothing(
        client, harness.history, cut_off, rescuer, ids, PARTITION_TASKS, 15
    )
    assert report.unexpected == (), report.render()
    assert report.duplicate_deliveries == PARTITION_TASKS, report.render()


def _now_s() -> float:
    return time.monotonic_ns() / 1e9


# --- fault 9: a slow network between workers and the broker -----------------------------------

SLOW_TASKS: Final = 24
SLOW_CONCURRENCY: Final = 6


async def test_fault9_slow_network_long_tasks_keep_their_leases_through_extension(
    running: RunningBroker, client: Client, harness: Harness, broker_proxy: FaultProxy
) -> None:
    broker_proxy.delay(100, 300)  # each way, from the first byte on
    async with Client(broker_proxy.address) as slow:
        await slow.stats(QUEUE)  # connected
        started = time.monotonic()
        await slow.stats(QUEUE)
        round_trip_s = time.monotonic() - started
    assert 0.2 <= round_trip_s < 1.0, f"a call through the proxy took {round_trip_s:.3f}s"
    ids = await harness.enqueue(client, SLOW_TASKS)
    workers = [
        harness.start(
            f"slow-{seconds}s",
            {"job": "sleep"},
            sleep=timedelta(seconds=seconds),
            lease=SLOW_NETWORK_LEASE,
            concurrency=SLOW_CONCURRENCY,
            target=broker_proxy.address,
        )
        for seconds in (2, 3)
    ]
    await until_stats(
        client, lambda s: s.succeeded_total == SLOW_TASKS, 30, "every task done under delay"
    )
    for worker in workers:
        assert await worker.aterminate() == 0, worker.log_text()

    stats = await queue_stats(client)
    assert (stats.reclaimed_total, stats.retried_total, stats.leased, stats.pending) == (0, 0, 0, 0)
    tasks = await final_tasks(client, ids)
    assert Counter(outcome(t)[:2] + outcome(t)[3:] for t in tasks.values()) == {
        ("SUCCEEDED", 1, ()): SLOW_TASKS
    }
    history = harness.history()
    assert Counter(d.attempt for d in history.deliveries) == {1: SLOW_TASKS}
    assert Counter((s.kind, s.outcome) for s in history.settlements) == {("ack", "ok"): SLOW_TASKS}
    assert {e.worker: e.stale_settlements for e in history.exits} == {
        w.worker_id: 0 for w in workers
    }
    # Both handler lengths ran: every task ran on the worker whose name it carries as result.
    assert {t.result for t in tasks.values()} == {b"slow-2s", b"slow-3s"}
    report = harness.check(tasks)
    assert report.ok, report.render()
    assert report.duplicate_deliveries == 0, report.render()
