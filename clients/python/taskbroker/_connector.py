"""Connector: keeps a Lease stream open for a worker run, and sends settlements on a live one.

`Capacity` turns free concurrency into credits, `Connector` opens and reopens streams
(reconnecting with backoff, moving on after a drain) and publishes the current one in
`ActiveStream`, and `Settler` delivers acks, nacks and extensions on whichever stream is alive.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final

import grpc

from taskbroker._convert import to_duration
from taskbroker._lease_stream import LeaseStream, Settlement, StreamListener, StreamLost
from taskbroker._status import error_from_rpc
from taskbroker.v1 import lease_pb2

if TYPE_CHECKING:
    from taskbroker._lifecycle import Lifecycle
    from taskbroker._worker_options import WorkerOptions
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub

log = logging.getLogger("taskbroker.worker")

#: Reconnect backoff: 0.1 s doubling to 5 s, with equal jitter.
RECONNECT_INITIAL_S: Final = 0.1
RECONNECT_MAX_S: Final = 5.0
#: A stream that lived this long before failing resets the backoff.
STABLE_STREAM_S: Final = 5.0
#: How long to wait for the broker's `opened` answer.
OPEN_TIMEOUT_S: Final = 10.0
#: Open failures that retrying cannot fix (a bad queue name, no such service, no access).
FATAL_OPEN_CODES: Final = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
#: A settlement answered UNAVAILABLE ("outcome unknown, may be retried") is retried this often.
SETTLE_RETRIES: Final = 5
SETTLE_RETRY_S: Final = 0.2
#: How long a half-closed stream gets for the broker to answer what is in flight and end it.
CLOSE_TIMEOUT_S: Final = 5.0

#: Called with a new stream, the leases its open frame asked to resume, and the broker's answers.
ResumeHandler = Callable[
    [LeaseStream, Sequence[lease_pb2.HeldLease], Sequence[lease_pb2.SettleResult]], None
]


async def wait_first(*waits: Awaitable[object]) -> None:
    """Waits until the first of `waits` finishes, and cancels the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


class Backoff:
    """Exponential backoff with equal jitter (at least half the cap, so retries spread out)."""

    def __init__(self, initial_s: float = RECONNECT_INITIAL_S, max_s: float = RECONNECT_MAX_S):
        self._initial_s = initial_s
        self._max_s = max_s
        self._failures = 0

    def next(self) -> float:
        cap = min(self._max_s, self._initial_s * 2.0**self._failures)
        self._failures += 1
        return cap / 2 + random.uniform(0, cap / 2)

    def reset(self) -> None:
        self._failures = 0


#: Settlements awaiting their answer, per slot of concurrency, whose slot may be granted again
#: meanwhile (Capacity.hand_back_early). At one, a worker with fast handlers was often back at
#: its limit when the next deliveries came before the answers: 2,954-4,129 tasks/s at
#: concurrency 10 against 3,719-3,887 at two (four did no better); 2,456-3,037 without.
EARLY_SETTLEMENTS_PER_SLOT = 2


class Capacity:
    """Free concurrency, granted as credits: held tasks plus unused credits never exceed it
    (a task whose handler ended may stop counting before its settlement is answered:
    hand_back_early). Nothing is granted once the run stops granting (at shutdown)."""

    def __init__(self, concurrency: int, lifecycle: Lifecycle) -> None:
        self.concurrency = concurrency
        self._lifecycle = lifecycle
        #: Deliveries accepted and not finished (running, or waiting for a slot), and those
        #: settling whose slot was not handed back early.
        self.held = 0
        #: Deliveries whose handler ended and whose slot was handed back before the broker
        #: answered their settlement (hand_back_early).
        self.settling = 0

    def hand_back_early(self) -> bool:
        """A handler ended and its settlement is about to be sent: its slot is granted again
        now, in the same frame as the settlement, rather than once the broker answers it. A
        worker whose handlers are fast then waits one round trip per task instead of two. At
        most EARLY_SETTLEMENTS_PER_SLOT times `concurrency` settlements wait this way, so a
        broker slow to answer them holds at most three times `concurrency` of this worker's
        leases, two thirds of them finished. Returns whether the slot was handed back (the
        caller then ends it with `settled`)."""
        if self.settling >= EARLY_SETTLEMENTS_PER_SLOT * self.concurrency:
            return False
        self.held -= 1
        self.settling += 1
        return True

    def settled(self) -> None:
        """The broker answered a settlement whose slot was handed back early."""
        self.settling -= 1

    def opening_credits(self) -> int:
        if not self._lifecycle.granting:
            return 0
        return max(0, self.concurrency - self.held)

    def grant(self, stream: LeaseStream) -> int:
        """Credits to top the stream up with (called by its writer just before sending)."""
        if not self._lifecycle.granting or stream.draining:
            return 0
        n = self.concurrency - self.held - stream.unused_credits
        if n <= 0:
            return 0
        stream.unused_credits += n
        return n


class ActiveStream:
    """The stream deliveries come on now (None while reconnecting), for those who send on it."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self.stream: LeaseStream | None = None

    async def set(self, stream: LeaseStream | None) -> None:
        async with self._changed:
            self.stream = stream
            self._changed.notify_all()

    async def wait(self) -> LeaseStream:
        """Returns the current stream, waiting for one to open if needed."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.stream is not None and self.stream.usable)
            assert self.stream is not None
            return self.stream

    def request_credit(self) -> None:
        """Asks the current stream, if any, to top up the broker's credits."""
        if (stream := self.stream) is not None:
            stream.request_credit()


class Connector:
    """Keeps one Lease stream open for deliveries: opens it, reconnects with backoff when it
    fails, and opens a new one at once when the broker drains the current one. A drained stream
    stays open for the settlements of what it delivered, and is half-closed once they are done.

    Args:
        stub: The BrokerService stub to open streams on.
        options: The worker's queues, id and lease length.
        capacity: Grants the credits.
        active: Where the current stream is published.
        lifecycle: Whether the run still grants credits (a drain then needs no new stream).
        listener: Receives each stream's deliveries, revocations and drains.
        held_leases: The leases still running or settling, to resume on a new stream.
        on_resumed: Applies the broker's answers to a resume.
        settled: Set whenever a task finishes (a retiring stream waits for its last one).
    """

    def __init__(
        self,
        stub: BrokerServiceAsyncStub,
        options: WorkerOptions,
        capacity: Capacity,
        active: ActiveStream,
        lifecycle: Lifecycle,
        listener: StreamListener,
        held_leases: Callable[[], list[lease_pb2.HeldLease]],
        on_resumed: ResumeHandler,
        settled: asyncio.Event,
    ) -> None:
        self._stub = stub
        self._options = options
        self._capacity = capacity
        self._active = active
        self._lifecycle = lifecycle
        self._listener = listener
        self._held_leases = held_leases
        self._on_resumed = on_resumed
        self._settled = settled
        self._retiring: set[asyncio.Task[None]] = set()
        self.streams: set[LeaseStream] = set()
        #: Set when a stream first opens.
        self.opened = asyncio.Event()

    async def run(self) -> None:
        """Runs until cancelled.

        Raises:
            TaskbrokerError: The broker refused the open frame (for example a bad queue name).
        """
        backoff = Backoff()
        while True:
            stream = await self._open()
            if stream is None:
                delay = backoff.next()
                log.info("reconnecting in %.2fs", delay)
                await asyncio.sleep(delay)
                continue
            opened_at = time.monotonic()
            await self._activate(stream)
            drained = await self._wait(stream)
            await self._activate(None)
            if drained:
                log.info("broker is draining lease stream %s; opening another", stream.stream_id)
                self._retire(stream)
                backoff.reset()
                continue
            self.streams.discard(stream)
            if time.monotonic() - opened_at >= STABLE_STREAM_S:
                backoff.reset()
            delay = backoff.next()
            log.warning(
                "lease stream %s ended (%s); reconnecting in %.2fs",
                stream.stream_id,
                describe_end(stream.error),
                delay,
            )
            await asyncio.sleep(delay)

    def _open_frame(self) -> lease_pb2.LeaseOpen:
        return lease_pb2.LeaseOpen(
            queues=list(self._options.queues),
            worker_id=self._options.worker_id,
            credits=self._capacity.opening_credits(),
            lease_duration=to_duration(self._options.lease_duration),
            # Leases of handlers still running move to the new stream, so a broken connection
            # or a broker's drain does not run their tasks a second time.
            resume=self._held_leases(),
        )

    async def _open(self) -> LeaseStream | None:
        stream = LeaseStream(self._stub, self._listener, self._capacity.grant)
        frame = self._open_frame()
        try:
            await stream.open(frame, OPEN_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in FATAL_OPEN_CODES:
                raise error_from_rpc(exc) from None
            log.warning("cannot open a lease stream: %s", describe_end(exc))
            return None
        except (TimeoutError, StreamLost) as exc:
            log.warning("cannot open a lease stream: %s", str(exc) or "timed out")
            return None
        log.info(
            "lease stream %s open on %s (credits %d)",
            stream.stream_id,
            ",".join(self._options.queues),
            stream.unused_credits,
        )
        self._on_resumed(stream, frame.resume, stream.resumed)
        self.streams.add(stream)
        self.opened.set()
        return stream

    async def _activate(self, stream: LeaseStream | None) -> None:
        await self._active.set(stream)
        if stream is not None:
            stream.request_credit()  # tasks that finished while it was opening freed slots

    async def _wait(self, stream: LeaseStream) -> bool:
        """Waits until the stream ends (False) or is drained while the worker runs on (True)."""
        while True:
            if stream.ended.is_set():
                return False
            if stream.draining and self._lifecycle.granting:
                return True
            waits = [stream.ended.wait()]
            if not stream.draining:
                waits.append(stream.drained.wait())
            await wait_first(*waits)

    def _retire(self, stream: LeaseStream) -> None:
        task = asyncio.create_task(self._close_when_done(stream))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_when_done(self, stream: LeaseStream) -> None:
        while stream.held and not stream.ended.is_set():
            await wait_first(stream.ended.wait(), self._settled.wait())
            self._settled.clear()
        await stream.close(CLOSE_TIMEOUT_S)
        self.streams.discard(stream)

    async def close(self) -> None:
        """Half-closes every stream and waits for the broker to end them."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        streams = list(self.streams)
        self.streams.clear()
        await asyncio.gather(*(s.close(CLOSE_TIMEOUT_S) for s in streams))


def describe_end(error: BaseException | None) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return "ended by the broker" if error is None else str(error)


class Settler:
    """Sends settlements until answered: on the stream that delivered the lease while it lives,
    else on the current one (after a reconnect: the broker accepts them on any stream)."""

    def __init__(self, active: ActiveStream) -> None:
        self._active = active

    async def send(self, origin: LeaseStream, settlement: Settlement) -> lease_pb2.SettleResult:
        unavailable = 0
        while True:
            stream = origin if origin.usable else await self._active.wait()
            try:
                result = await stream.settle(settlement)
            except StreamLost:
                continue
            if result.outcome == lease_pb2.SETTLE_OUTCOME_UNAVAILABLE and (
                unavailable < SETTLE_RETRIES
            ):
                unavailable += 1
                await asyncio.sleep(SETTLE_RETRY_S * unavailable)
                continue
            return result
