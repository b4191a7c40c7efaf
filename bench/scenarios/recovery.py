"""recovery: a worker process holding 100 tasks (its handlers never return) is SIGKILLed; the
time until all 100 are running in a second, idle worker process. The broker sees the stream break
and hands the held tasks back at once; a second variant freezes the worker with SIGSTOP instead,
so its connection stays up and the tasks come back only by lease expiry (reclaimed within
reap_interval_s, 0.25 s, of the deadline)."""

from __future__ import annotations

import signal
import time

from bench.children import Child
from bench.context import Ctx
from bench.results import Target
from bench.scenarios.common import enqueue_bulk, start_workers, tasks

HELD = 100
#: The lease the workers ask for: short, so the SIGSTOP variant ends soon.
LEASE_MS = 2_000
WAIT_S = 15.0


async def run(ctx: Ctx) -> None:
    res = ctx.result
    res.metric(f"SIGKILL → {HELD} running elsewhere", "s", Target("<", 1.0))
    res.metric(f"SIGSTOP → {HELD} running elsewhere", "s")
    res.note(
        f"lease {LEASE_MS / 1000:g} s (SDK extends at half of what remains); "
        "SIGKILL: the broker releases a broken stream's tasks at once; SIGSTOP: the connection "
        "stays open, so they return by lease expiry + reaper (every 0.25 s)"
    )
    for run_no in ctx.runs():
        for name, sig in (("SIGKILL", signal.SIGKILL), ("SIGSTOP", signal.SIGSTOP)):
            seconds = await _one(ctx, sig)
            res.metric(f"{name} → {HELD} running elsewhere", "s").add(seconds)
            res.runs.append({"run": run_no, "signal": name, "seconds": round(seconds, 4)})
            await ctx.env.reap_children()
            await ctx.env.flush()


async def _hanging_worker(ctx: Ctx, queue: str, label: str) -> Child:
    (worker,) = await start_workers(
        ctx, queue, 1, mode="hang", concurrency=HELD, lease_ms=LEASE_MS, notify_at=(HELD,),
        label=label,
    )  # fmt: skip
    return worker


async def _one(ctx: Ctx, sig: int) -> float:
    queue = ctx.queue("recovery")
    victim = await _hanging_worker(ctx, queue, "victim")
    async with ctx.client() as client:
        await enqueue_bulk(client, tasks(queue, HELD))
    await victim.wait_event("started", WAIT_S)
    rescuer = await _hanging_worker(ctx, queue, "rescuer")
    signalled = time.time()
    victim.kill(sig)
    event = await rescuer.wait_event("started", WAIT_S)
    return float(event["t"]) - signalled
