"""`python -m bench.bare_grpc_proc`: gRPC alone beside large calls, the noisy-neighbour floor.

`--serve`: a bare grpc.aio server with the health service and one method that takes bytes and
answers two (no broker, no Redis, no protobuf parse of the body); emits `ready` with its port
and serves until stdin closes.

`--noise TARGET`: calls that method with --call-bytes of body at --bytes-per-s in all, from
--callers concurrent callers: the noisy client's 4 MiB Enqueue calls at the broker's byte limit,
with nothing but gRPC in the way. Emits `ready` once a call has been answered, then `done` with
the count of calls when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from bench.protocol import emit

MIB = 1024 * 1024
SERVICE, METHOD = "bench.BareSink", "Put"


async def _put(body: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return b"ok"


async def serve() -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * MIB)])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    sink: dict[str, grpc.RpcMethodHandler[bytes, bytes]]
    sink = {METHOD: grpc.unary_unary_rpc_method_handler(_put)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, sink)])
    port = server.add_insecure_port("[::]:0")
    await server.start()
    emit("ready", port=port)
    await asyncio.to_thread(sys.stdin.read)  # until the parent closes stdin or kills us
    await server.stop(0)


class Pace:
    """Hands out call start times call_bytes / bytes_per_s apart, shared by every caller."""

    def __init__(self, call_bytes: int, bytes_per_s: int) -> None:
        self.gap_s = call_bytes / bytes_per_s
        self.next_at = time.monotonic()

    async def wait_turn(self) -> None:
        now = time.monotonic()
        at = max(now, self.next_at)
        self.next_at = at + self.gap_s
        await asyncio.sleep(at - now)


async def noise(args: argparse.Namespace) -> None:
    options = [("grpc.max_send_message_length", 64 * MIB)]
    async with grpc.aio.insecure_channel(args.noise, options=options) as channel:
        put: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
        put = channel.unary_unary(f"/{SERVICE}/{METHOD}")
        body = bytes(args.call_bytes)
        pace = Pace(args.call_bytes, args.bytes_per_s)
        calls = 0

        async def caller() -> None:
            nonlocal calls
            while True:
                await pace.wait_turn()
                await put(body, timeout=30)
                calls += 1

        await put(body, timeout=30)
        emit("ready")
        callers = [asyncio.create_task(caller()) for _ in range(args.callers)]
        await asyncio.to_thread(sys.stdin.read)
        emit("done", calls=calls)
        for task in callers:
            task.cancel()
        await asyncio.gather(*callers, return_exceptions=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bare_grpc_proc")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--serve", action="store_true")
    mode.add_argument("--noise", metavar="TARGET")
    p.add_argument("--call-bytes", type=int, default=4 * MIB)
    p.add_argument("--bytes-per-s", type=int, default=16 * MIB)
    p.add_argument("--callers", type=int, default=8)
    return p.parse_args()


if __name__ == "__main__":
    parsed = parse_args()
    asyncio.run(serve() if parsed.serve else noise(parsed))
