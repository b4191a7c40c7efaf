"""`python -m bench.producer_proc`: concurrent unary Enqueue calls (one task each) from one
process, for the unary scenario. Several of these run at once so the client side is not the
limit on a small machine.

Emits `ready` after a warm-up call; then reads `{"start": t0, "end": t1}` (wall times) from
stdin, runs --concurrency loops of `await client.enqueue(...)` from t0 to t1, and emits
`result` with the calls that completed in the window and their median round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.protocol import emit
from bench.stats import median
from bench.worker_proc import TASK_TYPE
from taskbroker import Client, TaskbrokerError

PAYLOAD = b"x" * 100


async def _loop(
    call: Callable[[], Awaitable[object]], end: float, counts: list[int], round_trips: list[float]
) -> None:
    while time.time() < end:
        started = time.perf_counter()
        try:
            await call()
            counts[0] += 1
            round_trips.append(time.perf_counter() - started)
        except (TaskbrokerError, grpc.aio.AioRpcError):
            counts[1] += 1


async def main(args: argparse.Namespace) -> None:
    async with Client(args.target, timeout=30.0) as client:
        await client.enqueue(args.queue, TASK_TYPE, PAYLOAD)  # connect before the clock starts
        emit("ready")
        line = await asyncio.to_thread(sys.stdin.readline)
        window = json.loads(line)
        await asyncio.sleep(max(0.0, float(window["start"]) - time.time()))
        counts = [0, 0]  # calls, errors
        call: Callable[[], Awaitable[object]]
        if args.call == "health":  # the floor: the cheapest unary call the same server answers
            health = health_pb2_grpc.HealthStub(client.channel)
            request = health_pb2.HealthCheckRequest()

            def call() -> Awaitable[object]:
                reply: Awaitable[object] = health.Check(request)
                return reply
        else:

            def call() -> Awaitable[object]:
                return client.enqueue(args.queue, TASK_TYPE, PAYLOAD)

        round_trips: list[float] = []
        end = float(window["end"])
        await asyncio.gather(
            *(_loop(call, end, counts, round_trips) for _ in range(args.concurrency))
        )
        emit(
            "result",
            calls=counts[0],
            errors=counts[1],
            finished=time.time(),
            p50_round_trip_us=1e6 * median(round_trips) if round_trips else 0.0,
        )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.producer_proc")
    p.add_argument("--target", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--concurrency", type=int, default=25)
    p.add_argument("--call", choices=("enqueue", "health"), default="enqueue")
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
