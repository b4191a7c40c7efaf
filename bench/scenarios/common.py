"""Steps several scenarios share: payloads, bulk enqueue, worker processes, waiting for acks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench.children import Child
from bench.context import Ctx
from bench.results import ScenarioResult
from bench.worker_proc import TASK_TYPE
from taskbroker import Client, NewTask

#: Every scenario's tasks carry a payload of this size (the issue's "100-byte payloads").
PAYLOAD = b"x" * 100
#: How often completion is polled through Stats near the end: the error of an end time is at
#: most this. Far from the end polls are sparser (up to POLL_MAX_S), so that the Stats calls
#: cost the broker next to nothing while it is being measured.
POLL_S = 0.01
POLL_MAX_S = 0.25
#: How long a worker process may take to start and open its stream.
WORKER_READY_S = 30.0


def tasks(queue: str, n: int, *, max_attempts: int | None = None) -> list[NewTask]:
    return [NewTask(queue, TASK_TYPE, PAYLOAD, max_attempts=max_attempts) for _ in range(n)]


async def start_workers(
    ctx: Ctx,
    queue: str,
    count: int,
    *,
    mode: str = "noop",
    concurrency: int | None = None,
    lease_ms: int = 30_000,
    notify_at: Sequence[int] = (1,),
    record_header: str = "",
    label: str = "worker",
) -> list[Child]:
    """Starts `count` worker processes on `queue` and waits until each has its stream open."""
    children = []
    for i in range(count):
        args = [
            "--target", ctx.env.target, "--queue", queue, "--mode", mode,
            "--concurrency", str(concurrency or ctx.options.concurrency),
            "--lease-ms", str(lease_ms), "--worker-id", f"{label}-{i}",
            "--notify-at", ",".join(map(str, notify_at)),
        ]  # fmt: skip
        if record_header:
            record = ctx.env.workdir / f"{queue}-{label}-{i}.json"
            args += ["--record-header", record_header, "--record-file", str(record)]
        children.append(await ctx.env.spawn("bench.worker_proc", args, f"{queue}-{label}-{i}"))
    await asyncio.gather(*(c.wait_event("ready", WORKER_READY_S) for c in children))
    return children


async def stop_workers(children: Sequence[Child]) -> None:
    await asyncio.gather(*(c.stop() for c in children))


def first_start(children: Sequence[Child]) -> float | None:
    """Wall time at which the first handler started in any of the workers (None: none did).
    Read after the fact, so a worker whose line arrived late still counts."""
    times = [
        float(e["t"])
        for c in children
        for e in c.events
        if e.get("event") == "started" and e.get("n") == 1
    ]
    return min(times) if times else None


@dataclass(frozen=True, slots=True)
class Completion:
    """How far a queue got: `done` acked by wall time `at`; `capped` if the cap came first."""

    done: int
    at: float
    capped: bool


async def wait_succeeded(client: Client, queue: str, n: int, cap_s: float) -> Completion:
    """Polls Stats until `n` tasks of `queue` succeeded, or `cap_s` passed. The pause between
    polls is a quarter of the time the current pace says is left, within POLL_S..POLL_MAX_S."""
    deadline = time.monotonic() + cap_s
    last: tuple[float, int] | None = None
    while True:
        (stats,) = await client.stats(queue)
        now = time.time()
        done = stats.succeeded_total
        if done >= n:
            return Completion(done, now, False)
        if time.monotonic() >= deadline:
            return Completion(done, now, True)
        pause = POLL_S
        if last is not None and done > last[1]:
            left_s = (n - done) * (now - last[0]) / (done - last[1])
            pause = min(max(left_s / 4, POLL_S), POLL_MAX_S)
        last = (now, done)
        await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))


async def enqueue_bulk(client: Client, batch: Sequence[NewTask]) -> float:
    """Enqueues tasks with enqueue_many (1,000 per call). Returns the elapsed seconds."""
    started = time.perf_counter()
    await client.enqueue_many(batch)
    return time.perf_counter() - started


#: Scenarios that run the task lifecycle without gRPC, against which the drain is a percentage.
LIFECYCLE_REFERENCES = ("ceiling", "floor")


def add_floor_ratios(results: Sequence[ScenarioResult]) -> None:
    """Adds the best drain configuration's rate as a % of each lifecycle reference (ceiling,
    floor) to that reference's metrics: each drain run against the reference's median."""
    by_name = {r.name: r for r in results}
    drain = by_name.get("drain")
    if drain is None:
        return
    drains = [m for m in drain.metrics if m.name.startswith("drain") and m.median is not None]
    if not drains:
        return
    best = max(drains, key=lambda m: m.median or 0.0)
    for name in LIFECYCLE_REFERENCES:
        reference = by_name.get(name)
        if reference is None or not reference.metrics or reference.metrics[0].median is None:
            continue
        raw = reference.metrics[0].median
        ratio = reference.metric(f"drain as % of {name} ({best.name.removeprefix('drain ')})", "%")
        for value in best.values:
            ratio.add(100 * value / raw)
