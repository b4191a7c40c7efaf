"""unary: single-task Enqueue calls against the cheapest unary call the same broker answers (a
health Check on the same channel), two ways: 50 concurrent producers for a fixed window (calls/s;
asyncio tasks spread over --unary-procs client processes), and one caller making one call after
another (its round trip, and the broker's CPU per call)."""

from __future__ import annotations

import asyncio
import time

from bench import procfs
from bench.context import Ctx
from bench.results import Target

TARGET = Target(">=", 8_000)
#: Issue 15: a lone enqueue() and the broker's work for it, each ≤ 1.3 times a health Check's.
RATIO_TARGET = Target("<=", 1.3)
PRODUCERS = 50
WINDOW_S = 5.0
QUICK_WINDOW_S = 2.0
SEQUENTIAL_WINDOW_S = 3.0
QUICK_SEQUENTIAL_WINDOW_S = 1.0


async def run(ctx: Ctx) -> None:
    window_s = ctx.options.seconds(WINDOW_S, QUICK_WINDOW_S)
    sequential_s = ctx.options.seconds(SEQUENTIAL_WINDOW_S, QUICK_SEQUENTIAL_WINDOW_S)
    res = ctx.result
    metric = res.metric(f"Enqueue, 1 task/call, {PRODUCERS} concurrent", "calls/s", TARGET)
    floor = res.metric(f"floor: health Check on the same server, {PRODUCERS} concurrent", "calls/s")
    ratio = res.metric("Enqueue as % of the floor", "%")
    rtt = res.metric("sequential enqueue() round trip, p50", "µs")
    rtt_floor = res.metric("sequential health Check round trip, p50", "µs")
    rtt_ratio = res.metric("sequential round trip, enqueue() / health Check", "x", RATIO_TARGET)
    cpu = res.metric("broker CPU per Enqueue call (sequential)", "µs")
    cpu_floor = res.metric("broker CPU per health Check (sequential)", "µs")
    cpu_ratio = res.metric("broker CPU per call, Enqueue / health Check", "x", RATIO_TARGET)
    res.note(
        f"{PRODUCERS} producers over {ctx.options.unary_procs} client process(es), {window_s:g} s "
        "window; no workers (the tasks stay pending). The floor is grpcio's cost of a unary call "
        "on this machine: the cheapest RPC the same broker answers, with the same clients."
    )
    res.note(
        f"sequential: one caller, one call at a time for {sequential_s:g} s, through the SDK's "
        "Client.enqueue() and a health stub on the same channel; broker CPU is its process's "
        "over the window divided by the calls."
    )
    for run_no in ctx.runs():
        floor_rate, _ = await _window(ctx, "health", window_s, PRODUCERS)
        rate, details = await _window(ctx, "enqueue", window_s, PRODUCERS)
        floor.add(floor_rate)
        metric.add(rate)
        ratio.add(100 * rate / floor_rate if floor_rate else 0.0)
        _, health = await _window(ctx, "health", sequential_s, 1)
        _, enqueue = await _window(ctx, "enqueue", sequential_s, 1)
        rtt_floor.add(health["p50_round_trip_us"])
        rtt.add(enqueue["p50_round_trip_us"])
        rtt_ratio.add(enqueue["p50_round_trip_us"] / health["p50_round_trip_us"])
        cpu_floor.add(health["broker_cpu_us_per_call"])
        cpu.add(enqueue["broker_cpu_us_per_call"])
        cpu_ratio.add(enqueue["broker_cpu_us_per_call"] / health["broker_cpu_us_per_call"])
        res.runs.append(
            {
                "run": run_no,
                "floor_calls_per_s": round(floor_rate),
                **details,
                "sequential_health": health,
                "sequential_enqueue": enqueue,
            }
        )
        await ctx.env.reap_children()
        await ctx.env.flush()


async def _window(
    ctx: Ctx, call: str, window_s: float, concurrency: int
) -> tuple[float, dict[str, float]]:
    """One measuring window of `call` ("enqueue" or "health") by `concurrency` callers (one
    caller: in one process). Returns calls/s and details."""
    procs = min(ctx.options.unary_procs, concurrency)
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
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
    for p in producers:
        await p.send({"start": start, "end": start + window_s})
    # Counted from the window's start: the broker's idle half second is not the calls' cost.
    await asyncio.sleep(max(0.0, start - time.time()))
    cpu0 = procfs.tree_cpu_seconds(broker_pid)
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
        "broker_cpu_percent_of_a_core": round(100 * broker_cpu / elapsed, 1),
        "broker_cpu_us_per_call": round(1e6 * broker_cpu / calls, 1) if calls else 0.0,
        # The median over the processes' medians (one process for a lone caller).
        "p50_round_trip_us": round(
            sorted(float(r.get("p50_round_trip_us", 0.0)) for r in results)[len(results) // 2], 1
        ),
    }
