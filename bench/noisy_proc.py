"""`python -m bench.noisy_proc`: one misbehaving client, for the noisy-neighbour scenario. Until
stdin closes it at once: opens more Lease streams on one connection than the broker allows,
sends settlements frames at the broker's limits (10,000 acks of unknown tasks over 100 queues)
and far past them (150,000), and keeps --enqueuers concurrent Enqueue calls of 4 x 1 MiB going.
Emits `ready` once every kind of load has started, and `done` with its counts at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import grpc

from bench.protocol import emit
from taskbroker._client import DEFAULT_OPTIONS
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import broker_service_pb2_grpc, lease_pb2, task_pb2

if TYPE_CHECKING:
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub

MIB = 1024 * 1024
#: Settlements frames: at the default limits (items, queues), and far past the item limit.
AT_LIMIT = (10_000, 100)
PAST_LIMIT = (150_000, 500)


def _frame(items: int, queues: int) -> lease_pb2.LeaseRequest:
    acks = [
        lease_pb2.AckRequest(task_id=f"noise-{i % queues}:{i}", lease_id=secrets.token_hex(16))
        for i in range(items)
    ]
    return lease_pb2.LeaseRequest(settlements=lease_pb2.Settlements(acks=acks))


def _count(counts: Counter[str], what: str, exc: grpc.aio.AioRpcError) -> None:
    """Counts an outcome by status code; an unexpected code is also reported with its details."""
    counts[f"{what} {exc.code().name}"] += 1
    if exc.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT):
        emit("unexpected", what=what, code=exc.code().name, details=exc.details())


async def _open(stub: BrokerServiceAsyncStub, queue: str) -> Any:
    call = stub.Lease()
    await call.write(lease_pb2.LeaseRequest(open=lease_pb2.LeaseOpen(queues=[queue], credits=1)))
    first = await call.read()
    if not isinstance(first, lease_pb2.LeaseResponse):
        raise RuntimeError(f"no opened frame: {first!r}")
    return call


async def _drain(call: Any) -> None:
    """Reads whatever the broker answers, so only the limits push back."""
    while await call.read() is not grpc.aio.EOF:
        pass


async def _settler(
    stub: BrokerServiceAsyncStub, queue: str, counts: Counter[str], at: int, past: bool
) -> None:
    """One stream after another: `at` frames at the limit, then one past it (the stream fails)."""
    at_limit, past_limit = _frame(*AT_LIMIT), _frame(*PAST_LIMIT)
    while True:
        try:
            call = await _open(stub, queue)
        except grpc.aio.AioRpcError as exc:
            _count(counts, "stream refused", exc)
            await asyncio.sleep(0.05)
            continue
        reader = asyncio.create_task(_drain(call))
        try:
            for _ in range(at):
                await call.write(at_limit)
                counts["frames at limit"] += 1
            if past:
                await call.write(past_limit)
                counts["frames past limit"] += 1
            else:
                await call.done_writing()
            await reader
        except grpc.aio.AioRpcError as exc:
            _count(counts, "stream ended", exc)
        finally:
            reader.cancel()
            call.cancel()


async def _stream_hog(stub: BrokerServiceAsyncStub, queue: str, counts: Counter[str]) -> None:
    """Opens streams on one connection until refused, holds them, tries again now and then."""
    held = []
    while True:
        try:
            held.append(await _open(stub, queue))
            counts["streams held"] += 1
        except grpc.aio.AioRpcError as exc:
            _count(counts, "stream refused", exc)
            await asyncio.sleep(0.05)


async def _enqueuer(
    stub: BrokerServiceAsyncStub, queue: str, counts: Counter[str], per_call: int = 4
) -> None:
    payload = bytes(MIB - 1024)  # a task at the default size limit (its type counts too)
    request = bs.EnqueueRequest(
        tasks=[task_pb2.TaskSpec(queue=queue, type="blob", payload=payload)] * per_call
    )
    while True:
        try:
            await stub.Enqueue(request, timeout=30)
            counts["enqueue accepted"] += 1
        except grpc.aio.AioRpcError as exc:
            _count(counts, "enqueue", exc)
            await asyncio.sleep(0.01)


async def main(args: argparse.Namespace) -> None:
    options = [
        *DEFAULT_OPTIONS.items(),
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_send_message_length", 64 * MIB),
    ]
    channels = [grpc.aio.insecure_channel(args.target, options=options) for _ in range(3)]
    hog, settle, produce = (broker_service_pb2_grpc.BrokerServiceStub(c) for c in channels)
    counts: Counter[str] = Counter()
    jobs = [asyncio.create_task(_stream_hog(hog, args.queue, counts)) for _ in range(args.hogs)]
    jobs += [
        asyncio.create_task(_settler(settle, args.queue, counts, args.frames, args.past > 0))
        for _ in range(args.settlers)
    ]
    jobs += [
        asyncio.create_task(_enqueuer(produce, args.queue, counts, args.per_call))
        for _ in range(args.enqueuers)
    ]
    await asyncio.sleep(1.0)
    emit("ready")
    await asyncio.to_thread(sys.stdin.read)  # until the parent closes stdin or kills us
    # The counts go out first: winding down calls stuck behind flow control may take a while,
    # and the parent needs only the counts (it kills us if we linger).
    emit("done", counts=dict(counts))
    for job in jobs:
        job.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)
    await asyncio.gather(*(c.close() for c in channels))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.noisy_proc")
    p.add_argument("--target", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--hogs", type=int, default=1)
    p.add_argument("--settlers", type=int, default=4)
    p.add_argument("--enqueuers", type=int, default=8)
    p.add_argument("--per-call", type=int, default=4, help="1 MiB tasks per Enqueue call")
    p.add_argument("--frames", type=int, default=5, help="frames at the limit per stream")
    p.add_argument("--past", type=int, default=1, help="1: end each stream with a frame past it")
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
