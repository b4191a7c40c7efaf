"""many_queues: issue 11 §3. 100,000 queues, each holding one task delayed by an hour, on a fresh
broker; the same run with 1 queue as the baseline. Measured: the broker's CPU over an idle window
(/proc/<pid>/stat), GetTask p99 (sequential calls on random tasks), and how late after its
deadline an expired 1 s lease is reclaimed (a raw Lease stream takes one task and never settles
it; GetTask is polled until the task is no longer LEASED). Maintenance must touch only queues
with work due (the due index), so none of these may grow with the number of queues."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import timedelta

import grpc
from google.protobuf import duration_pb2

from bench import procfs
from bench.context import Ctx
from bench.results import Target
from bench.scenarios.common import PAYLOAD
from bench.worker_proc import TASK_TYPE
from taskbroker import NewTask
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import broker_service_pb2_grpc, lease_pb2, task_pb2

QUEUES = 100_000
QUICK_QUEUES = 10_000
IDLE_S = 10.0
QUICK_IDLE_S = 4.0
SETTLE_S = 2.0
GETS = 1_000
LEASE_S = 1.0
ENQUEUE_BATCH = 1_000
FILL_CALLS = 4


async def run(ctx: Ctx) -> None:
    many = ctx.options.size(QUEUES, QUICK_QUEUES)
    idle_s = ctx.options.seconds(IDLE_S, QUICK_IDLE_S)
    res = ctx.result
    cpu_name = f"broker CPU while idle, {many:,} queues"
    res.metric(cpu_name, "% of a core", Target("<", 5, "< 5 %"))
    res.metric("broker CPU while idle, 1 queue", "% of a core")
    res.metric(f"reclaim after lease deadline, {many:,} queues", "s", Target("<", 1.0))
    res.metric(f"GetTask p99, {many:,} queues", "ms")
    res.metric("GetTask p99, 1 queue", "ms")
    res.metric(f"GetTask p99 ratio {many:,} / 1 queue", "x", Target("<=", 1.5))
    fill_name = f"enqueue_many filling {many:,} queues, a task each"
    res.metric(fill_name, "tasks/s")
    res.note(f"each queue holds one task delayed 1 h; {GETS} sequential GetTask calls")
    res.note(
        f"filling: calls of {ENQUEUE_BATCH:,} tasks, each for a queue of its own, "
        f"{FILL_CALLS} calls at once"
    )
    for run_no in ctx.runs():
        figures = {}
        for n in (1, many):
            await ctx.env.flush()
            broker = await ctx.env.restart_broker()
            filling = time.perf_counter()
            ids = await _fill(ctx, n)
            if n == many:
                res.metric(fill_name, "tasks/s").add(n / (time.perf_counter() - filling))
            await asyncio.sleep(SETTLE_S)
            cpu0 = procfs.tree_cpu_seconds(broker.pid)
            redis0 = procfs.cpu_seconds(ctx.env.redis_server.pid)
            await asyncio.sleep(idle_s)
            cpu = 100 * (procfs.tree_cpu_seconds(broker.pid) - cpu0) / idle_s
            redis_cpu = 100 * (procfs.cpu_seconds(ctx.env.redis_server.pid) - redis0) / idle_s
            p99 = await _get_p99(ctx, ids)
            late = await _reclaim_late(ctx)
            figures[n] = (cpu, p99, late, redis_cpu)
        (cpu1, p99_1, _, _), (cpu_n, p99_n, late_n, redis_n) = figures[1], figures[many]
        res.metric(cpu_name, "% of a core").add(cpu_n)
        res.metric("broker CPU while idle, 1 queue", "% of a core").add(cpu1)
        res.metric(f"reclaim after lease deadline, {many:,} queues", "s").add(late_n)
        res.metric(f"GetTask p99, {many:,} queues", "ms").add(p99_n)
        res.metric("GetTask p99, 1 queue", "ms").add(p99_1)
        res.metric(f"GetTask p99 ratio {many:,} / 1 queue", "x").add(p99_n / p99_1)
        res.runs.append(
            {"run": run_no, "redis_cpu_percent_idle_many": round(redis_n, 2)}
            | {f"queues_{n}": [round(x, 4) for x in f] for n, f in figures.items()}
        )
    await ctx.env.flush()


async def _fill(ctx: Ctx, n: int) -> list[str]:
    """One task delayed by an hour in each of n queues (FILL_CALLS calls at once). Returns the
    task ids."""
    label = ctx.queue("many")
    async with ctx.client(timeout_s=120) as client:

        async def one(start: int) -> list[str]:
            batch = [
                NewTask(f"{label}-{i}", TASK_TYPE, PAYLOAD, delay=timedelta(hours=1))
                for i in range(start, min(n, start + ENQUEUE_BATCH))
            ]
            return [r.task_id for r in await client.enqueue_many(batch)]

        starts = list(range(0, n, ENQUEUE_BATCH))
        ids: list[str] = []
        for k in range(0, len(starts), FILL_CALLS):
            for got in await asyncio.gather(*(one(s) for s in starts[k : k + FILL_CALLS])):
                ids += got
    return ids


async def _get_p99(ctx: Ctx, ids: list[str]) -> float:
    async with grpc.aio.insecure_channel(ctx.env.target) as channel:
        stub = broker_service_pb2_grpc.BrokerServiceStub(channel)
        times = []
        for _ in range(GETS):
            started = time.perf_counter()
            await stub.GetTask(bs.GetTaskRequest(task_id=random.choice(ids)))
            times.append(time.perf_counter() - started)
    times.sort()
    return 1000 * times[int(len(times) * 0.99) - 1]


async def _reclaim_late(ctx: Ctx) -> float:
    """Seconds between a never-settled 1 s lease's deadline and its task leaving LEASED."""
    queue = ctx.queue("probe")
    async with ctx.client() as client:
        await client.enqueue_many([NewTask(queue, TASK_TYPE, PAYLOAD)])
    async with grpc.aio.insecure_channel(ctx.env.target) as channel:
        stub = broker_service_pb2_grpc.BrokerServiceStub(channel)
        call = stub.Lease()
        lease = duration_pb2.Duration()
        lease.FromTimedelta(timedelta(seconds=LEASE_S))
        opening = lease_pb2.LeaseOpen(queues=[queue], credits=1, lease_duration=lease)
        await call.write(lease_pb2.LeaseRequest(open=opening))
        frame = await call.read()
        while not (isinstance(frame, lease_pb2.LeaseResponse) and frame.HasField("deliveries")):
            frame = await call.read()
        delivery = frame.deliveries.deliveries[0]
        deadline = delivery.lease_expire_time.ToMilliseconds() / 1000  # Redis's clock, local
        task_id = delivery.task.id
        late: float | None = None
        while late is None:
            got = await stub.GetTask(bs.GetTaskRequest(task_id=task_id))
            if got.task.state != task_pb2.TASK_STATE_LEASED:
                late = time.time() - float(deadline)
            else:
                await asyncio.sleep(0.01)
        call.cancel()
    return late
