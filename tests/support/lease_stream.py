"""LeaseStream: a test worker speaking the Lease protocol over a real gRPC channel."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TYPE_CHECKING

import grpc
from google.protobuf import duration_pb2

from taskbroker.v1 import lease_pb2

if TYPE_CHECKING:
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub


def duration(value: timedelta) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(value)
    return d


class LeaseStream:
    """Opens a Lease stream and collects what the broker sends, by frame kind."""

    def __init__(self, stub: BrokerServiceAsyncStub) -> None:
        self.call = stub.Lease()
        self.deliveries: asyncio.Queue[lease_pb2.Delivery] = asyncio.Queue()
        self.results: asyncio.Queue[lease_pb2.SettleResult] = asyncio.Queue()
        self.revoked: asyncio.Queue[lease_pb2.RevokedLease] = asyncio.Queue()
        self.drains: asyncio.Queue[lease_pb2.Drain] = asyncio.Queue()
        self.opened: lease_pb2.LeaseOpened | None = None
        self._reader: asyncio.Task[None] | None = None
        self.ended = asyncio.Event()
        self.error: grpc.aio.AioRpcError | None = None

    async def open(
        self,
        queues: list[str],
        credits: int,
        lease: timedelta | None = None,
        worker_id: str = "test-worker",
        resume: list[lease_pb2.HeldLease] | None = None,
    ) -> LeaseStream:
        frame = lease_pb2.LeaseOpen(
            queues=queues, credits=credits, worker_id=worker_id, resume=resume or []
        )
        if lease is not None:
            frame.lease_duration.CopyFrom(duration(lease))
        await self.call.write(lease_pb2.LeaseRequest(open=frame))
        first = await asyncio.wait_for(self.call.read(), 5)
        assert isinstance(first, lease_pb2.LeaseResponse), first
        assert first.WhichOneof("frame") == "opened", first
        self.opened = first.opened
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            while (response := await self.call.read()) is not grpc.aio.EOF:
                assert isinstance(response, lease_pb2.LeaseResponse)
                kind = response.WhichOneof("frame")
                if kind == "deliveries":
                    for d in response.deliveries.deliveries:
                        self.deliveries.put_nowait(d)
                elif kind == "settle_results":
                    for r in response.settle_results.results:
                        self.results.put_nowait(r)
                elif kind == "revoked":
                    for rv in response.revoked.leases:
                        self.revoked.put_nowait(rv)
                elif kind == "drain":
                    self.drains.put_nowait(response.drain)
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            self.ended.set()

    async def take(self, n: int, wait_s: float = 5.0) -> list[lease_pb2.Delivery]:
        """Waits for n deliveries."""
        return [await asyncio.wait_for(self.deliveries.get(), wait_s) for _ in range(n)]

    async def credit(self, n: int) -> None:
        await self.call.write(lease_pb2.LeaseRequest(credit=lease_pb2.LeaseCredit(credits=n)))

    async def ack(self, d: lease_pb2.Delivery, result: bytes = b"") -> lease_pb2.SettleResult:
        ack = lease_pb2.AckRequest(task_id=d.task.id, lease_id=d.lease_id, result=result)
        await self.call.write(lease_pb2.LeaseRequest(ack=ack))
        return await asyncio.wait_for(self.results.get(), 5)

    async def nack(
        self,
        d: lease_pb2.Delivery,
        error: str = "boom",
        retry_delay: timedelta | None = None,
        dead_letter: bool = False,
    ) -> lease_pb2.SettleResult:
        nack = lease_pb2.NackRequest(
            task_id=d.task.id, lease_id=d.lease_id, error=error, dead_letter=dead_letter
        )
        if retry_delay is not None:
            nack.retry_delay.CopyFrom(duration(retry_delay))
        await self.call.write(lease_pb2.LeaseRequest(nack=nack))
        return await asyncio.wait_for(self.results.get(), 5)

    async def extend(self, d: lease_pb2.Delivery, lease: timedelta) -> lease_pb2.SettleResult:
        ext = lease_pb2.ExtendLeaseRequest(
            task_id=d.task.id, lease_id=d.lease_id, lease_duration=duration(lease)
        )
        await self.call.write(lease_pb2.LeaseRequest(extend=ext))
        return await asyncio.wait_for(self.results.get(), 5)

    async def close(self) -> None:
        """Half-closes and waits for the broker to end the stream."""
        await self.call.done_writing()
        await asyncio.wait_for(self.ended.wait(), 5)

    def cancel(self) -> None:
        """Drops the stream as a crashed worker would."""
        self.call.cancel()
