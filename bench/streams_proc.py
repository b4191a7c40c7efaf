"""`python -m bench.streams_proc`: many idle Lease streams from one process, as many idle
workers would hold them, for the idle-streams scenario. Raw grpc.aio streams on the generated
stubs are far cheaper than SDK workers, so the broker's cost is what gets measured.

Streams are spread over --channels connections (each channel gets its own subchannel pool, so
its own TCP connection). Each opens with --credits credits and then sends nothing. Emits
`ready` once every stream is open, then holds them until stdin closes or the process is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Any

import grpc

from bench.protocol import emit
from taskbroker._client import DEFAULT_OPTIONS
from taskbroker.v1 import broker_service_pb2_grpc, lease_pb2

if TYPE_CHECKING:
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub

#: Streams opened at once: the broker answers each open with one frame.
OPEN_BATCH = 100


async def _open(stub: BrokerServiceAsyncStub, queue: str, credits: int, n: int) -> Any:
    call = stub.Lease()
    frame = lease_pb2.LeaseOpen(queues=[queue], worker_id=f"idle-{n}", credits=credits)
    await call.write(lease_pb2.LeaseRequest(open=frame))
    first = await call.read()
    if not isinstance(first, lease_pb2.LeaseResponse) or first.WhichOneof("frame") != "opened":
        raise RuntimeError(f"stream {n}: no `opened` answer: {first!r}")
    return call


async def main(args: argparse.Namespace) -> None:
    options = [*DEFAULT_OPTIONS.items(), ("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(args.target, options=options) for _ in range(args.channels)
    ]
    stubs = [broker_service_pb2_grpc.BrokerServiceStub(c) for c in channels]
    calls = []
    for start in range(0, args.streams, OPEN_BATCH):
        batch = range(start, min(args.streams, start + OPEN_BATCH))
        calls += await asyncio.gather(
            *(_open(stubs[n % len(stubs)], args.queue, args.credits, n) for n in batch)
        )
    emit("ready", streams=len(calls))
    await asyncio.to_thread(sys.stdin.read)  # until the parent closes stdin or kills us
    for call in calls:
        call.cancel()
    await asyncio.gather(*(c.close() for c in channels))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.streams_proc")
    p.add_argument("--target", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--streams", type=int, default=1_000)
    p.add_argument("--channels", type=int, default=10)
    p.add_argument("--credits", type=int, default=1)
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
