"""LeaseStream: one Lease call as the worker sees it. It opens the stream, reads frames in one task
and writes them in another (grpc.aio allows one write in flight), grants credits when asked, and
matches in-stream settlements to the answers the broker sends back."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar, Final, Protocol, TypeAlias

import grpc

from taskbroker.v1 import lease_pb2

if TYPE_CHECKING:
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub

log = logging.getLogger("taskbroker.worker")


class StreamLost(Exception):
    """The stream ended (or was closing) before the broker answered."""


class StreamListener(Protocol):
    """What the worker does with the frames a stream receives."""

    def on_deliveries(self, stream: LeaseStream, deliveries: Sequence[lease_pb2.Delivery]) -> None:
        """Tasks were leased to the stream."""

    def on_revoked(self, stream: LeaseStream, leases: Sequence[lease_pb2.RevokedLease]) -> None:
        """Leases the stream held are no longer valid."""

    def on_drain(self, stream: LeaseStream) -> None:
        """The broker behind the stream is shutting down."""


@dataclass(frozen=True, slots=True)
class Ack:
    """Settle a lease as succeeded."""

    request: lease_pb2.AckRequest
    #: The SettleResult.kind that answers it.
    kind: ClassVar[lease_pb2.SettleKind.ValueType] = lease_pb2.SETTLE_KIND_ACK


@dataclass(frozen=True, slots=True)
class Nack:
    """Settle a lease as failed (retried later, or dead-lettered)."""

    request: lease_pb2.NackRequest
    kind: ClassVar[lease_pb2.SettleKind.ValueType] = lease_pb2.SETTLE_KIND_NACK


@dataclass(frozen=True, slots=True)
class Extend:
    """Extend a lease."""

    request: lease_pb2.ExtendLeaseRequest
    kind: ClassVar[lease_pb2.SettleKind.ValueType] = lease_pb2.SETTLE_KIND_EXTEND


#: One ack, nack or extension as the worker hands it to the stream.
Settlement: TypeAlias = Ack | Nack | Extend


class _Signal(Enum):
    """An outbox entry that is not a settlement."""

    #: Ask the grant callback for credits and send them (queued at most once at a time).
    CREDIT = "credit"
    #: Half-close the stream (done_writing).
    HALF_CLOSE = "half-close"


_Key = tuple[str, lease_pb2.SettleKind.ValueType]  # (lease id, SettleResult.kind)

#: A settlements frame stops growing here (the broker accepts 16 MiB beyond its payload limit).
MAX_FRAME_BYTES: Final = 4 * 1024 * 1024


class LeaseStream:
    """One Lease call: its reader and writer tasks and the settlements awaiting an answer.

    Args:
        stub: The BrokerService stub to open the call on.
        listener: Receives deliveries, revocations and drain notices.
        grant: Called by the writer when credits were requested; returns how many to send (0:
            none) and must account for them in `unused_credits`.
    """

    def __init__(
        self,
        stub: BrokerServiceAsyncStub,
        listener: StreamListener,
        grant: Callable[[LeaseStream], int],
    ) -> None:
        self._stub = stub
        self._listener = listener
        self._grant = grant
        self._call: grpc.aio.StreamStreamCall[lease_pb2.LeaseRequest, lease_pb2.LeaseResponse]
        self._outbox: asyncio.Queue[Settlement | _Signal] = asyncio.Queue()
        self._pending: dict[_Key, deque[asyncio.Future[lease_pb2.SettleResult]]] = {}
        self._credit_queued = False
        self._tasks: list[asyncio.Task[None]] = []
        #: Identifies the stream in the broker's logs.
        self.stream_id = ""
        #: The lease length the broker uses for this stream's deliveries, in seconds.
        self.lease_s = 0.0
        #: Credits granted to the broker and not yet used by a delivery.
        self.unused_credits = 0
        #: Leases delivered on this stream that the worker has not finished with.
        self.held: set[str] = set()
        #: Set when the broker sent `drain`: no more deliveries will come.
        self.drained = asyncio.Event()
        #: Set when the stream has ended, for whatever reason.
        self.ended = asyncio.Event()
        #: The broker's answers to the open frame's resume entries, in order.
        self.resumed: list[lease_pb2.SettleResult] = []
        self.closing = False
        self.error: BaseException | None = None

    @property
    def usable(self) -> bool:
        """Whether settlements can still be sent on this stream."""
        return not (self.ended.is_set() or self.closing)

    @property
    def draining(self) -> bool:
        """Whether the broker said it is shutting down."""
        return self.drained.is_set()

    async def open(self, frame: lease_pb2.LeaseOpen, timeout_s: float) -> None:
        """Opens the stream and waits for `opened`; then starts reading and writing.

        Args:
            frame: The open frame; its credits become `unused_credits`.
            timeout_s: How long to wait for the broker's answer.

        Raises:
            grpc.aio.AioRpcError: The broker refused the stream or could not be reached.
            StreamLost: The broker ended the stream without answering.
            TimeoutError: No answer within `timeout_s`.
        """
        self._call = self._stub.Lease(wait_for_ready=True)
        try:
            async with asyncio.timeout(timeout_s):
                await self._call.write(lease_pb2.LeaseRequest(open=frame))
                first = await self._call.read()
        except BaseException:
            self._call.cancel()
            raise
        if not isinstance(first, lease_pb2.LeaseResponse) or first.WhichOneof("frame") != "opened":
            self._call.cancel()
            raise StreamLost("the broker ended the stream without opening it")
        self.stream_id = first.opened.stream_id
        self.resumed = list(first.opened.resumed)
        self.lease_s = first.opened.lease_duration.ToTimedelta().total_seconds()
        self.unused_credits = frame.credits
        self._tasks = [
            asyncio.create_task(self._read_loop(), name=f"lease stream {self.stream_id} reader"),
            asyncio.create_task(self._write_loop(), name=f"lease stream {self.stream_id} writer"),
        ]

    # --- sending ------------------------------------------------------------------------------

    def request_credit(self) -> None:
        """Asks the writer to top up the broker's credits (requests made meanwhile merge)."""
        if not self._credit_queued and self.usable and self._tasks:
            self._credit_queued = True
            self._outbox.put_nowait(_Signal.CREDIT)

    async def settle(self, settlement: Settlement) -> lease_pb2.SettleResult:
        """Sends an ack, nack or extension (in the next settlements frame) and waits for its
        SettleResult.

        Args:
            settlement: An Ack, Nack or Extend.

        Returns:
            The broker's answer.

        Raises:
            StreamLost: The stream ended before the answer came.
        """
        if not self.usable:
            raise StreamLost(f"lease stream {self.stream_id} has ended")
        key: _Key = (settlement.request.lease_id, settlement.kind)
        future: asyncio.Future[lease_pb2.SettleResult] = asyncio.get_running_loop().create_future()
        waiting = self._pending.setdefault(key, deque())
        waiting.append(future)
        self._outbox.put_nowait(settlement)
        try:
            return await future
        finally:
            if future in waiting:
                waiting.remove(future)
            if not waiting and self._pending.get(key) is waiting:
                del self._pending[key]

    def half_close(self) -> None:
        """Tells the broker nothing more will be sent; it answers what it got, then ends."""
        if self.usable:
            self.closing = True
            self._outbox.put_nowait(_Signal.HALF_CLOSE)

    def cancel(self) -> None:
        """Drops the stream; the broker gives back the leases it still holds for it."""
        if hasattr(self, "_call"):
            self._call.cancel()
        for task in self._tasks:
            task.cancel()
        self._end()

    async def close(self, timeout_s: float) -> None:
        """Half-closes, waits up to `timeout_s` for the broker to end the stream, then drops it."""
        self.half_close()
        try:
            await asyncio.wait_for(self.ended.wait(), timeout_s)
        except TimeoutError:
            log.warning(
                "lease stream %s did not end in %.1fs; dropping it", self.stream_id, timeout_s
            )
        self.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- the two loops ------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        try:
            while True:
                frame, half_close = self._next_frame(await self._outbox.get())
                if frame is not None:
                    await self._call.write(frame)
                if half_close:
                    await self._call.done_writing()
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the call failed under us: the reader sees why and ends it
            log.debug("lease stream %s: write failed: %r", self.stream_id, exc)
            self._call.cancel()

    def _next_frame(
        self, first: Settlement | _Signal
    ) -> tuple[lease_pb2.LeaseRequest | None, bool]:
        """Gathers everything queued since the last write into one settlements frame (no
        timer: while a write is in flight the next batch builds up). Returns the frame (None:
        nothing to send) and whether to half-close after it."""
        batch = lease_pb2.Settlements()
        credit, size, item = False, 0, first
        while True:
            if item is _Signal.HALF_CLOSE:
                break
            if item is _Signal.CREDIT:
                credit = True
            else:
                size += _add(batch, item)
            if size >= MAX_FRAME_BYTES or self._outbox.empty():
                break
            item = self._outbox.get_nowait()
        if credit:
            self._credit_queued = False
            batch.credits = max(0, self._grant(self))
        has_any = batch.credits or batch.acks or batch.nacks or batch.extends
        return (lease_pb2.LeaseRequest(settlements=batch) if has_any else None), (
            item is _Signal.HALF_CLOSE
        )

    async def _read_loop(self) -> None:
        try:
            while (response := await self._call.read()) is not grpc.aio.EOF:
                assert isinstance(response, lease_pb2.LeaseResponse)
                self._dispatch(response)
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # Reading a call cancelled locally (by the writer) raises CancelledError.
            self.error = StreamLost("cancelled")
        finally:
            self._end()

    def _dispatch(self, response: lease_pb2.LeaseResponse) -> None:
        kind = response.WhichOneof("frame")
        if kind == "deliveries":
            deliveries = response.deliveries.deliveries
            self.unused_credits = max(0, self.unused_credits - len(deliveries))
            self.held.update(d.lease_id for d in deliveries)
            self._listener.on_deliveries(self, deliveries)
        elif kind == "settle_results":
            for result in response.settle_results.results:
                self._resolve(result)
        elif kind == "revoked":
            leases = response.revoked.leases
            self.held.difference_update(r.lease_id for r in leases)
            self._listener.on_revoked(self, leases)
        elif kind == "drain":
            self.unused_credits = 0
            self.drained.set()
            self._listener.on_drain(self)

    def _resolve(self, result: lease_pb2.SettleResult) -> None:
        waiting = self._pending.get((result.lease_id, result.kind))
        while waiting:
            future = waiting.popleft()
            if not future.done():
                future.set_result(result)
                return

    def _end(self) -> None:
        if self.ended.is_set():
            return
        self.ended.set()
        lost = StreamLost(f"lease stream {self.stream_id} ended")
        for waiting in self._pending.values():
            for future in waiting:
                if not future.done():
                    future.set_exception(lost)
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()


def _add(batch: lease_pb2.Settlements, settlement: Settlement) -> int:
    """Puts a settlement in its place in a Settlements frame; returns its size in bytes."""
    match settlement:
        case Ack(request):
            batch.acks.append(request)
        case Nack(request):
            batch.nacks.append(request)
        case Extend(request):
            batch.extends.append(request)
    return settlement.request.ByteSize()
