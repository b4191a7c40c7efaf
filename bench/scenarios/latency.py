"""latency: single Enqueue calls at a fixed rate (open loop: a slow call does not delay the
next), one SDK worker consuming; per task, the handler-start wall time minus the producer's wall
time just before its Enqueue call (carried in a header). Producer (the bench process) and worker
(its own process) share the machine's clock.

Beside each rate, the same open loop of health Checks (the cheapest RPC the broker answers) on a
channel of its own: its round trip at that pace is what one gRPC hop alone costs on this machine
that day, the floor of a path that takes one call in and one stream write out (grpcio's cost per
call grows when the processes sleep between calls, so the back-to-back figure of `unary` is not
that floor)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.context import Ctx
from bench.results import Target
from bench.scenarios.common import PAYLOAD, start_workers, wait_succeeded
from bench.stats import percentile
from bench.worker_proc import TASK_TYPE
from taskbroker import Client, TaskbrokerError

#: 100/s is below what the broker sustains while it also drains (the latency of the hop itself);
#: 500/s and 2,000/s are the issue's rates.
RATES = (100, 500, 2_000)
WINDOW_S = 10.0
QUICK_WINDOW_S = 3.0
#: After the last send, how long calls still in flight get to answer (the rest are abandoned),
#: and then how long the worker gets to start what is left.
INFLIGHT_CAP_S = 3.0
DRAIN_CAP_S = 3.0
#: Issue 15's targets: at 100/s p50 <= 2 ms and p99 <= 4 ms; at 500/s the producer reaches the
#: rate and p99 <= 5 ms.
TARGETS = {
    (100, 50): Target("<=", 2.0),
    (100, 99): Target("<=", 4.0),
    (500, 99): Target("<=", 5.0),
}
RATE_REACHED = Target(">=", 0.95 * 500, ">= 475 calls/s (95 % of 500)")
#: Rates at which the health-Check floor is measured too.
FLOOR_RATES = (100, 500)
HEADER = "sent"


#: One call of an open loop, given the wall time it is sent at.
Call = Callable[[float], Awaitable[object]]


def _enqueue(client: Client, queue: str) -> Call:
    """A single-task enqueue() through the SDK, its send time in a header."""
    return lambda sent: client.enqueue(queue, TASK_TYPE, PAYLOAD, headers={HEADER: repr(sent)})


def _health_check(stub: health_pb2_grpc.HealthStub) -> Call:
    return lambda sent: stub.Check(health_pb2.HealthCheckRequest(), timeout=10)


class _OpenLoop:
    """Sends single calls on a fixed schedule, each in a task of its own."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self.call_ms: list[float] = []
        self.errors: Counter[str] = Counter()
        self.first_error: dict[str, str] = {}
        self.sent = 0
        self.last_sent = 0.0
        #: Calls still unanswered INFLIGHT_CAP_S after the last send, then cancelled.
        self.abandoned = 0

    async def _send(self) -> None:
        sent = time.time()
        try:
            await self._call(sent)
        except TaskbrokerError as exc:
            self.errors[exc.code.name] += 1
            self.first_error.setdefault(exc.code.name, str(exc)[:200])
            return
        except grpc.aio.AioRpcError as exc:
            self.errors[exc.code().name] += 1
            self.first_error.setdefault(exc.code().name, str(exc.details())[:200])
            return
        self.call_ms.append((time.time() - sent) * 1000)

    async def run(self, rate: int, window_s: float) -> dict[str, object]:
        """Sends rate * window_s calls; returns a summary of the calls' own latency."""
        total = round(rate * window_s)
        inflight: set[asyncio.Task[None]] = set()
        start = time.perf_counter()
        while self.sent < total:
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            while self.sent < due:
                task = asyncio.create_task(self._send())
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                self.sent += 1
            await asyncio.sleep(max(0.0, start + self.sent / rate - time.perf_counter()))
        achieved = self.sent / (time.perf_counter() - start)
        self.last_sent = time.time()
        if inflight:
            _, late = await asyncio.wait(inflight, timeout=INFLIGHT_CAP_S)
            self.abandoned = len(late)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        calls = self.call_ms
        return {
            "achieved_rate": round(achieved, 1),
            "abandoned_calls": self.abandoned,
            "errors": dict(self.errors),
            "first_errors": self.first_error,
            "call_p50_ms": round(percentile(calls, 50), 3) if calls else None,
            "call_p99_ms": round(percentile(calls, 99), 3) if calls else None,
        }


async def run(ctx: Ctx) -> None:
    window_s = ctx.options.seconds(WINDOW_S, QUICK_WINDOW_S)
    for rate in RATES:
        for p in (50, 95, 99, 100):
            name = f"{rate}/s: p{p}" if p < 100 else f"{rate}/s: max"
            ctx.result.metric(name, "ms", TARGETS.get((rate, p)))
        if rate == 500:
            ctx.result.metric("500/s: rate the producer reached", "calls/s", RATE_REACHED)
        if rate in FLOOR_RATES:
            for p in (50, 99):
                ctx.result.metric(f"{rate}/s: floor, health Check round trip p{p}", "ms")
                ctx.result.metric(f"{rate}/s: p{p} / the floor's p{p}", "x")
    ctx.result.note(
        "Enqueue call start (producer: the bench process) → handler start (one worker "
        f"process, concurrency {ctx.options.concurrency}), {window_s:g} s per rate, "
        "time.time() on both sides"
    )
    ctx.result.note(
        "floor: the same open loop of health Checks at the same rate on a channel of its own, "
        "no worker: one gRPC round trip at that pace on this machine"
    )
    for run_no in ctx.runs():
        for rate in RATES:
            samples = await _one(ctx, run_no, rate, window_s)
            await ctx.env.flush()
            if rate in FLOOR_RATES:
                await _floor(ctx, run_no, rate, window_s, samples)


async def _floor(
    ctx: Ctx, run_no: int, rate: int, window_s: float, samples: dict[int, float]
) -> None:
    """The health-Check open loop at `rate`; its p50/p99 beside the run's (samples)."""
    async with grpc.aio.insecure_channel(ctx.env.target) as channel:
        loop = _OpenLoop(_health_check(health_pb2_grpc.HealthStub(channel)))
        calls = await loop.run(rate, window_s)
    for p in (50, 99):
        floor_ms = percentile(loop.call_ms, p) if loop.call_ms else float("nan")
        ctx.result.metric(f"{rate}/s: floor, health Check round trip p{p}", "ms").add(floor_ms)
        ctx.result.metric(f"{rate}/s: p{p} / the floor's p{p}", "x").add(samples[p] / floor_ms)
    ctx.result.runs.append({"run": run_no, "rate": rate, "floor": "health Check", **calls})


async def _one(ctx: Ctx, run_no: int, rate: int, window_s: float) -> dict[int, float]:
    """One rate's run; returns its percentiles (50, 95, 99, 100) in ms."""
    queue = ctx.queue(f"latency{rate}")
    (worker,) = await start_workers(ctx, queue, 1, record_header=HEADER, label="latency")
    async with ctx.client() as client:
        producer = _OpenLoop(_enqueue(client, queue))
        calls = await producer.run(rate, window_s)
        enqueued = len(producer.call_ms)
        done = await wait_succeeded(client, queue, enqueued, DRAIN_CAP_S)
    await worker.stop()
    record = ctx.env.workdir / f"{queue}-latency-0.json"
    samples_ms = [s * 1000 for s in json.loads(record.read_text())]
    # Tasks not started by the end of the wait, and calls abandoned unanswered: each is at least
    # this late. Failed calls stored nothing and count nowhere (they are in the run's details).
    missing = enqueued + producer.abandoned - len(samples_ms)
    if missing > 0:
        samples_ms += [(done.at - producer.last_sent) * 1000] * missing
    found = {p: percentile(samples_ms, p) for p in (50, 95, 99, 100)}
    for p, value in found.items():
        name = f"{rate}/s: p{p}" if p < 100 else f"{rate}/s: max"
        ctx.result.metric(name, "ms").add(value, capped=missing > 0)
    achieved = calls["achieved_rate"]
    if rate == 500 and isinstance(achieved, float):
        ctx.result.metric("500/s: rate the producer reached", "calls/s").add(achieved)
    if isinstance(achieved, float) and achieved < 0.95 * rate:
        ctx.result.note(
            f"{rate}/s: the producer fell below 95 % of the rate (achieved_rate in the JSON)"
        )
    if producer.errors:
        codes = ", ".join(sorted(producer.errors))
        ctx.result.note(f"{rate}/s: some Enqueue calls failed ({codes}; counts in the JSON)")
    ctx.result.runs.append(
        {
            "run": run_no,
            "rate": rate,
            "sent": producer.sent,
            "not_started": max(0, missing),
            **calls,
        }
    )
    return found
