"""One client misbehaves (more Lease streams than allowed, settlements frames at and past the
limits, concurrent 1 MiB Enqueue calls past the byte budget) while a victim enqueues: the victim
is served throughout and loses nothing, and the misbehaviour is refused with clear statuses.

The noisy client is bench.noisy_proc in its own process (its CPU is not the broker's). The
victim's latency is not asserted here: beside the noisy client's megabyte messages the victim's
p99 is 3-5x its baseline (the 2x target is not met: each such message holds the event loop for
a few ms, docs/benchmarks.md), and on a shared CI machine the figure is noise. `make bench`
(noisy_neighbour) measures it."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from broker.app import Broker
from broker.config import MIB, Settings
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import broker_service_pb2_grpc, task_pb2
from tests.conftest import RunningBroker

ROOT = Path(__file__).resolve().parents[2]
CALLS = 80


async def _victim(stub: Any, n: int) -> list[float]:
    """n single-task Enqueue calls one after the other; their latencies in seconds."""
    request = bs.EnqueueRequest(tasks=[task_pb2.TaskSpec(queue="victim", type="t", payload=b"v")])
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        await stub.Enqueue(request, timeout=10)  # any failure fails the test
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.002)
    return sorted(latencies)


async def _events(proc: asyncio.subprocess.Process, until: str) -> list[dict[str, Any]]:
    """The noisy client's events up to and including the first called `until`."""
    assert proc.stdout is not None
    events: list[dict[str, Any]] = []
    while True:
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
        except TimeoutError:
            raise AssertionError(f"no {until!r} from the noisy client in 60 s: {events}") from None
        if not line:
            raise AssertionError(f"noisy client exited without {until!r}: {events}")
        events.append(json.loads(line))
        if events[-1]["event"] == until:
            return events


async def test_a_noisy_client_is_refused_while_a_victim_is_served(settings: Settings) -> None:
    limits = replace(
        settings,
        max_streams_per_connection=10,
        max_streams_per_client=10,
        max_inflight_request_bytes=8 * MIB,
        max_inflight_request_bytes_per_client=4 * MIB,
    )
    # Victim and noisy client both come from 127.0.0.1: here each connection is a client.
    broker = Broker(limits, client_key=lambda peer: peer)
    await broker.start()
    await broker.wake_listener.connected.wait()
    running = RunningBroker(broker)
    proc = None
    try:
        async with grpc.aio.insecure_channel(
            running.target, [("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            stub = broker_service_pb2_grpc.BrokerServiceStub(channel)
            await _victim(stub, 10)  # warm-up
            alone = await _victim(stub, CALLS)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.noisy_proc", "--target", running.target,
                "--queue", "noise", "--settlers", "2", "--enqueuers", "4", "--frames", "2",
                cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            events = await _events(proc, "ready")
            noisy = await _victim(stub, CALLS)
            assert proc.stdin is not None
            proc.stdin.close()
            events += await _events(proc, "done")
            counts = events[-1]["counts"]
            stats = await stub.Stats(bs.StatsRequest(queues=["victim"]))
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await running.close()

    # Nothing the victim enqueued was lost.
    assert stats.queues[0].pending == 10 + 2 * CALLS
    # Every kind of misbehaviour met its limit, with its status.
    assert counts.get("streams held", 0) <= 10
    assert counts.get("stream refused RESOURCE_EXHAUSTED", 0) > 0, counts
    assert counts.get("stream ended INVALID_ARGUMENT", 0) > 0, counts  # frames past the limit
    assert counts.get("enqueue RESOURCE_EXHAUSTED", 0) > 0, counts
    assert counts.get("enqueue accepted", 0) > 0, counts  # within the limits it is served
    # The broker never answered with an internal error or a traceback (grpc's client may report
    # a stream reset while it was still writing as INTERNAL "Internal error from Core").
    unexpected = [e for e in events if e["event"] == "unexpected"]
    assert not [e for e in unexpected if e["details"] == "internal error"], unexpected
    assert not [e for e in unexpected if e["code"] == "UNKNOWN"], unexpected
    # The victim was served throughout: every call above succeeded within its 10 s deadline.
    assert len(alone) == len(noisy) == CALLS
