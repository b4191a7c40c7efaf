"""unary: 50 concurrent producers, each calling Enqueue with one task at a time, for a fixed
window; calls/s. The producers are asyncio tasks spread over --unary-procs client processes."""

from __future__ import annotations

import asyncio
import time

from bench import procfs
from bench.context import Ctx
from bench.results import Target

TARGET = Target(">=", 8_000)
PRODUCERS = 50
WINDOW_S = 5.0
QUICK_WINDOW_S = 2.0


async def run(ctx: Ctx) -> None:
    window_s = ctx.options.seconds(WINDOW_S, QUICK_WINDOW_S)
    metric = ctx.result.metric(f"Enqueue, 1 task/call, {PRODUCERS} concurrent", "calls/s", TARGET)
    floor = ctx.result.metric(
        f"floor: health Check on the same server, {PRODUCERS} concurrent", "calls/s"
    )
    ratio = ctx.result.metric("Enqueue as % of the floor", "%")
    ctx.result.note(
        f"{PRODUCERS} producers over {ctx.options.unary_procs} client process(es), {window_s:g} s "
        "window; no workers (the tasks stay pending). The floor is grpcio's cost of a unary call "
        "on this machine: the cheapest RPC the same broker answers, with the same clients."
    )
    for run_no in ctx.runs():
        floor_rate, _ = await _window(ctx, "health", window_s)
        rate, details = await _window(ctx, "enqueue", window_s)
        floor.add(floor_rate)
        metric.add(rate)
        ratio.add(100 * rate / floor_rate if floor_rate else 0.0)
        ctx.result.runs.append({"run": run_no, "floor_calls_per_s": round(floor_rate), **details})
        await ctx.env.reap_children()
        await ctx.env.flush()


async def _window(ctx: Ctx, call: str, window_s: float) -> tuple[float, dict[str, float]]:
    """One measuring window of `call` ("enqueue" or "health"). Returns calls/s and details."""
    procs = ctx.options.unary_procs
    shares = [PRODUCERS // procs + (1 if i < PRODUCERS % procs else 0) for i in range(procs)]
    queue = ctx.queue("unary")
    producers = [
        await ctx.env.spawn(
            "bench.producer_proc",
            ["--target", ctx.env.target, "--queue", queue, "--concurrency", str(n), "--call", call],
            f"{queue}-{call}-{i}",
        )
        for i, n in enumerate(shares)
    ]
    await asyncio.gather(*(p.wait_event("ready", 30) for p in producers))
    start = time.time() + 0.5
    assert ctx.env.broker is not None
    broker_pid = ctx.env.broker.pid
    cpu0 = procfs.tree_cpu_seconds(broker_pid)
    for p in producers:
        await p.send({"start": start, "end": start + window_s})
    results = await asyncio.gather(*(p.wait_event("result", window_s + 30) for p in producers))
    broker_cpu = procfs.tree_cpu_seconds(broker_pid) - cpu0
    calls = sum(int(r["calls"]) for r in results)
    errors = sum(int(r["errors"]) for r in results)
    # The window closes for new calls at its end; calls in flight then still count, so the
    # divisor runs to the last producer's finish.
    elapsed = max(float(r["finished"]) for r in results) - start
    await ctx.env.reap_children()
    return calls / elapsed, {
        "calls": calls,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "broker_cpu_percent_of_a_core": round(100 * broker_cpu / (elapsed + 0.5), 1),
    }
