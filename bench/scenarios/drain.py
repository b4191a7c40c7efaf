"""drain: a backlog enqueued first (batch Enqueue through `Client.enqueue_many`), then consumed
by SDK workers in 1 and 2 processes, and by one process at the SDK's default concurrency of 10
(not bound by CPU: it shows the round trips each task waits for). Drain rate runs from the
first handler start to the last ack the broker counted (Stats polled every 10 ms); the queue
is paused while the backlog is enqueued and the workers connect, so neither is part of the
drain time.

Both steps have time caps so that a slow broker still finishes the whole bench in minutes: the
backlog stops growing at ENQUEUE_CAP_S (the drain then runs on what was enqueued) and the drain
at DRAIN_CAP_S (reporting the rate reached). At the targets' pace neither cap is reached."""

from __future__ import annotations

import time
from typing import Any

from bench import procfs
from bench.context import Ctx
from bench.results import Target
from bench.scenarios.common import first_start, start_workers, stop_workers, tasks, wait_succeeded
from taskbroker import Client, NewTask

DRAIN_TARGET = Target(">=", 25_000)
ENQUEUE_TARGET = Target(">=", 30_000)
ENQUEUE_CAP_S = {20_000: 4.0, 100_000: 8.0}
DRAIN_CAP_S = 5.0
PROCS = (1, 2)
#: The SDK worker's default concurrency: a worker this narrow waits on round trips, not CPU,
#: so its drain shows what each task's trip through the broker costs in latency.
DEFAULT_CONCURRENCY = 10
#: Tasks per Enqueue call (the broker's limit, and what enqueue_many sends).
CALL = 1_000


#: The processes whose CPU seconds per task the 1-process drain reports.
CPU_PARTS = ("broker", "worker", "redis")


def _label(size: int) -> str:
    return f"{size // 1000}k"


async def enqueue_capped(client: Client, batch: list[NewTask], cap_s: float) -> tuple[int, float]:
    """enqueue_many, 1,000 tasks at a time, until done or cap_s passed. Returns (tasks, s)."""
    started = time.perf_counter()
    sent = 0
    while sent < len(batch) and time.perf_counter() - started < cap_s:
        await client.enqueue_many(batch[sent : sent + CALL])
        sent += len(batch[sent : sent + CALL])
    return sent, time.perf_counter() - started


async def run(ctx: Ctx) -> None:
    sizes = (2_000, 10_000) if ctx.options.quick else (20_000, 100_000)
    res = ctx.result
    for size in sizes:  # declare in table order
        res.metric(f"enqueue_many {_label(size)}", "tasks/s", ENQUEUE_TARGET)
    for size in sizes:
        for procs in PROCS:
            res.metric(f"drain {_label(size)}, {procs} proc", "tasks/s", DRAIN_TARGET)
    res.metric(_narrow_label(sizes[0]), "tasks/s")
    for part in CPU_PARTS:
        res.metric(f"CPU per task, {_label(sizes[0])} 1 proc: {part}", "µs")
    caps = ", ".join(f"{_label(s)} {c:g} s" for s, c in ENQUEUE_CAP_S.items())
    res.note(
        f"{ctx.options.concurrency} concurrent no-op handlers per worker process; caps: enqueue "
        f"{caps}, drain {DRAIN_CAP_S:g} s (a capped drain reports the rate it had)"
    )
    for run_no in ctx.runs():
        for size in sizes:
            for procs in PROCS:
                cpu_per_task = size == sizes[0] and procs == 1
                res.runs.append(await _one(ctx, run_no, size, procs, cpu_per_task))
                await ctx.env.flush()
        narrow = await _one(ctx, run_no, sizes[0], 1, False, DEFAULT_CONCURRENCY)
        res.runs.append(narrow)
        await ctx.env.flush()


def _narrow_label(size: int) -> str:
    return f"drain {_label(size)}, 1 proc, concurrency {DEFAULT_CONCURRENCY}"


async def _one(
    ctx: Ctx, run_no: int, size: int, procs: int, cpu_per_task: bool, concurrency: int | None = None
) -> dict[str, Any]:
    """One drain: `procs` worker processes of `concurrency` (None: the bench's --concurrency)."""
    env = ctx.env
    assert env.broker is not None
    queue = ctx.queue(f"drain{_label(size)}x{procs}c{concurrency or ctx.options.concurrency}")
    async with ctx.client() as client:
        await client.pause(queue)
        workers = await start_workers(ctx, queue, procs, concurrency=concurrency)
        cap = ENQUEUE_CAP_S.get(size, max(ENQUEUE_CAP_S.values()))
        enqueued, enqueue_s = await enqueue_capped(client, tasks(queue, size), cap)
        ctx.result.metric(f"enqueue_many {_label(size)}", "tasks/s").add(
            enqueued / enqueue_s, capped=enqueued < size
        )
        pids = {"broker": env.broker.pid, "redis": env.redis_server.pid}
        pids |= {f"worker{i}": w.pid for i, w in enumerate(workers)}
        # The broker's figure covers all its processes (--broker-processes).
        cpu0 = {name: procfs.tree_cpu_seconds(pid) for name, pid in pids.items()}
        # How the work fell on the broker's serving processes: each connection (one per worker
        # process) is served by one of them.
        serving = procfs.descendants(env.broker.pid)
        serving_cpu0 = {pid: procfs.cpu_seconds(pid) for pid in serving}
        resumed = time.time()
        await client.resume(queue)
        done = await wait_succeeded(client, queue, enqueued, DRAIN_CAP_S)
        cpu = {name: procfs.tree_cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
        cpu |= {
            f"broker process {i}": procfs.cpu_seconds(pid) - serving_cpu0[pid]
            for i, pid in enumerate(serving)
        }
        (left,) = await client.stats(queue)
    start = first_start(workers) or resumed
    elapsed = max(done.at - start, 1e-9)
    capped = done.capped or enqueued < size
    rate = _narrow_label(size) if concurrency else f"drain {_label(size)}, {procs} proc"
    ctx.result.metric(rate, "tasks/s").add(done.done / elapsed, capped=capped)
    if cpu_per_task and done.done:
        # Where the CPU goes, per task: what any speed-up has to shrink.
        per_part = {"broker": cpu["broker"], "worker": cpu["worker0"], "redis": cpu["redis"]}
        for part, seconds in per_part.items():
            ctx.result.metric(f"CPU per task, {_label(size)} 1 proc: {part}", "µs").add(
                1e6 * seconds / done.done, capped=capped
            )
    if done.capped:
        await env.reap_children()
    else:
        await stop_workers(workers)
    wall = max(done.at - resumed, 1e-9)
    return {
        "run": run_no,
        "size": size,
        "procs": procs,
        "concurrency": concurrency or ctx.options.concurrency,
        "enqueued": enqueued,
        "enqueue_s": round(enqueue_s, 4),
        "drained": done.done,
        "drain_s": round(elapsed, 4),
        "first_delivery_after_resume_s": round(start - resumed, 4),
        "capped": capped,
        "left": {"pending": left.pending, "leased": left.leased, "paused": left.paused},
        "cpu_percent_of_a_core": {k: round(100 * v / wall, 1) for k, v in cpu.items()},
    }
