"""One Lease stream: the open handshake, credits, pushed deliveries, in-stream settlements, and
giving back what it still holds when it ends."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from broker.api import convert, frame_scan, settle_wire
from broker.api.limits import Foreground, Pacer, RateMeter
from broker.api.outbox import MAX_MESSAGE_BYTES, MERGEABLE, Message, Outbox, wrap
from broker.api.status import error_status, to_status
from broker.auth.authorize import Authorizer
from broker.auth.principal import Role, current_principal
from broker.errors import (
    BrokerError,
    ForeignLease,
    InvalidArgument,
    LeaseStale,
    PermissionDenied,
    TaskNotFound,
)
from broker.ids import check_name
from broker.models import ExtendItem, HeldLease, Lease, SettleResult, SettleStatus, TaskRef
from broker.queue import MAX_LEASE_MS, MIN_LEASE_MS, AckCall, SettleItem, refusal
from taskbroker.v1 import lease_pb2

if TYPE_CHECKING:
    from broker.dispatch import Dispatcher, Subscription
    from broker.queue import TaskQueue

log = logging.getLogger(__name__)

MAX_QUEUES_PER_STREAM = 64
#: Unused credits a stream may hold; bounds what one worker can pin.
MAX_CREDITS = 10_000

Frame = lease_pb2.LeaseResponse


#: LeaseResponse field numbers of the frames the outbox merges.
_FIELD_NUMBERS = {kind: Frame.DESCRIPTOR.fields_by_name[kind].number for kind in MERGEABLE}


def _message(frame: Frame) -> Message:
    """A frame for the outbox (a mergeable one as the encoding of its inner message)."""
    kind = frame.WhichOneof("frame")
    assert kind is not None
    if kind in MERGEABLE:
        return Message(kind, getattr(frame, kind).SerializeToString())
    return Message(kind, frame.SerializeToString())


class _Open(NamedTuple):
    """A checked open frame."""

    queues: list[str]
    lease_ms: int
    credits: int
    resume: list[lease_pb2.HeldLease]


def _is_eof(raw: object) -> bool:
    """Whether a read hit the end of the stream: ServicerContext.read() returns grpc.aio.EOF
    then, though the stubs say it returns only the request type."""
    return raw is grpc.aio.EOF


class SessionRegistry:
    """Live sessions by the leases they hold: unary settlements forget a lease, cancellations
    revoke it, a resume moves it, shutdown drains them all."""

    def __init__(self, foreground: Foreground | None = None) -> None:
        self.sessions: set[LeaseSession] = set()
        #: Unary calls being served, which large frames step aside for (Pacer).
        self.foreground = foreground or Foreground()
        self._holder: dict[str, LeaseSession] = {}
        self._background: set[asyncio.Task[None]] = set()
        #: Set whenever a held lease is settled, so shutdown can wait for the last one.
        self.settled = asyncio.Event()
        #: Lanes for large settlements frames (LeaseSession._settle_batch), shared by all streams.
        self.settle_lanes = asyncio.Semaphore(SETTLE_LANES)
        #: Large settlements frames read and not yet applied, per client (over all its streams,
        #: ended ones included): a client reads no more of them past LARGE_FRAMES_PER_CLIENT.
        self._large_frames: Counter[str] = Counter()
        self._large_frame_done = asyncio.Condition()

    def large_frame_read(self, client: str, settling: asyncio.Task[None]) -> None:
        """Counts a large frame of the client until its settling task ends (however it ends)."""
        self._large_frames[client] += 1

        def done(_: asyncio.Task[None]) -> None:
            self._large_frames[client] -= 1
            if not self._large_frames[client]:
                del self._large_frames[client]
            self.spawn(self._notify_large_frame_done())

        settling.add_done_callback(done)

    async def _notify_large_frame_done(self) -> None:
        async with self._large_frame_done:
            self._large_frame_done.notify_all()

    async def large_frame_room(self, client: str) -> None:
        """Waits while the client has LARGE_FRAMES_PER_CLIENT large frames not yet applied."""
        if self._large_frames[client] < LARGE_FRAMES_PER_CLIENT:  # every read comes here
            return
        async with self._large_frame_done:
            await self._large_frame_done.wait_for(
                lambda: self._large_frames[client] < LARGE_FRAMES_PER_CLIENT
            )

    def held(self, lease_id: str, session: LeaseSession) -> None:
        """The session holds the lease now; a session of this replica that held it before (the
        lease was resumed on a new stream) lets go of it."""
        previous = self._holder.get(lease_id)
        if previous is not None and previous is not session:
            previous.forget(lease_id)
        self._holder[lease_id] = session

    def forget(self, lease_id: str) -> None:
        if session := self._holder.pop(lease_id, None):
            session.forget(lease_id)
            self.settled.set()

    def let_go(self, lease_id: str, session: LeaseSession) -> None:
        """The session ended: it no longer answers for the lease (unless another holds it)."""
        if self._holder.get(lease_id) is session:
            del self._holder[lease_id]

    def revoke(self, task_id: str, lease_id: str, reason: str) -> None:
        if session := self._holder.pop(lease_id, None):
            session.revoke(task_id, lease_id, reason)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Runs cleanup that must finish even when the stream's handler is cancelled."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_background(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


class LeaseSession:
    """Serves one Lease stream (bytes in, bytes out: requests are parsed here so malformed frames
    get INVALID_ARGUMENT rather than grpcio's UNKNOWN)."""

    def __init__(
        self,
        context: grpc.aio.ServicerContext[bytes, bytes],
        tasks: TaskQueue,
        dispatcher: Dispatcher,
        registry: SessionRegistry,
        open_timeout_s: float,
        default_lease_ms: int,
        authorizer: Authorizer,
        meter: RateMeter | None = None,
        client: str = "",
    ) -> None:
        self._context = context
        #: Whose stream this is (a client's IP, or its principal under a policy).
        self._client = client
        #: The client's byte rate, read against (none: unmetered)
        self._meter = meter
        self._authorizer = authorizer
        #: Whom the stream's leases are bound to (the task's `lp`): only it may settle them.
        self._holder = current_principal.get().scope
        self._tasks = tasks
        self._dispatcher = dispatcher
        self._registry = registry
        self._open_timeout_s = open_timeout_s
        self._default_lease_ms = default_lease_ms
        settings = tasks.settings
        self._write_timeout_s = settings.stream_write_timeout_s
        self.stream_id = secrets.token_hex(8)
        self._outbox = Outbox(settings.stream_outbox_bytes, self._receiving_again, _FIELD_NUMBERS)
        self._held: dict[str, TaskRef] = {}  # lease id -> task
        #: Leases queued for this stream whose delivery has not been written yet.
        self._unsent: set[str] = set()
        self._failure: grpc.Status | None = None
        #: Set when the stream was cut for not reading: nothing more can be sent on it.
        self._cut = False
        self._settling: set[asyncio.Task[None]] = set()
        self._sub: Subscription | None = None
        self.closed = False
        #: For the dashboard (/api/workers): who opened the stream, on what, since when (epoch ms).
        self.worker_id = ""
        self.queues: tuple[str, ...] = ()
        self.opened_ms = 0

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        opened = await self._read_open()
        if opened is None:
            return
        self.queues, self.opened_ms = tuple(opened.queues), int(time.time() * 1000)
        self._registry.sessions.add(self)
        reader: asyncio.Task[None] | None = None
        try:
            resumed = await self._resume(opened.resume)
            self._sub = self._dispatcher.subscribe(
                opened.queues,
                opened.lease_ms,
                self._deliver,
                stream_id=self.stream_id,
                can_receive=self._can_receive,
                holder=self._holder,
            )
            reader = asyncio.create_task(self._read_loop(), name=f"lease {self.stream_id} reader")
            self._outbox.put_nowait(
                _message(
                    Frame(
                        opened=lease_pb2.LeaseOpened(
                            stream_id=self.stream_id,
                            lease_duration=convert.to_duration(opened.lease_ms),
                            resumed=resumed,
                        )
                    )
                )
            )
            if opened.credits:
                self._grant(opened.credits)
            await self._write_loop()
        finally:
            self.closed = True
            self._registry.sessions.discard(self)
            if self._sub is not None:
                self._sub.close()
            if reader is not None:
                reader.cancel()
            self._hand_back()
        if self._cut:
            # Returning would make grpc send a status behind the stuck data, which fails; the
            # call ends when the worker goes away or its connection closes.
            await asyncio.Event().wait()
        if self._failure is not None:
            await self._context.abort_with_status(self._failure)

    async def _read_open(self) -> _Open | None:
        try:
            raw = await asyncio.wait_for(self._context.read(), self._open_timeout_s)
        except TimeoutError:
            await self._abort_invalid("open", f"no open frame within {self._open_timeout_s:g} s")
            return None
        if _is_eof(raw):
            return None
        request = self._parse(raw)
        if request is None:
            await self._abort_invalid("frame", "not a valid LeaseRequest")
            return None
        if request.WhichOneof("frame") != "open":
            await self._abort_invalid("open", "the first frame must be open")
            return None
        try:
            opened = self._check_open(request.open)
            self._authorizer.require(Role.CONSUME, opened.queues, "lease")
        except (InvalidArgument, PermissionDenied) as exc:
            await self._context.abort_with_status(error_status(exc))  # raises
        return opened

    def _check_open(self, frame: lease_pb2.LeaseOpen) -> _Open:
        if not frame.queues:
            raise InvalidArgument("open.queues", "at least one queue is required")
        if len(frame.queues) > MAX_QUEUES_PER_STREAM:
            raise InvalidArgument("open.queues", f"at most {MAX_QUEUES_PER_STREAM} queues")
        queues = [check_name(f"open.queues[{i}]", q) for i, q in enumerate(frame.queues)]
        if len(set(queues)) != len(queues):
            raise InvalidArgument("open.queues", "queues must be distinct")
        if len(frame.worker_id) > 128 or not frame.worker_id.isprintable():
            raise InvalidArgument("open.worker_id", "at most 128 printable characters")
        if not 0 <= frame.credits <= MAX_CREDITS:
            raise InvalidArgument("open.credits", f"must be 0 to {MAX_CREDITS}")
        if len(frame.resume) > MAX_CREDITS:
            raise InvalidArgument("open.resume", f"at most {MAX_CREDITS} leases")
        lease_ms = self._default_lease_ms
        if frame.HasField("lease_duration"):
            lease_ms = convert.duration_ms(frame.lease_duration)
            if not MIN_LEASE_MS <= lease_ms <= MAX_LEASE_MS:
                raise InvalidArgument(
                    "open.lease_duration", f"must be {MIN_LEASE_MS} ms to {MAX_LEASE_MS} ms"
                )
        self.worker_id = frame.worker_id
        log.info(
            "lease stream %s opened by %r on %s%s",
            self.stream_id,
            frame.worker_id,
            queues,
            f", resuming {len(frame.resume)} leases" if frame.resume else "",
        )
        return _Open(queues, lease_ms, frame.credits, list(frame.resume))

    async def _resume(self, entries: list[lease_pb2.HeldLease]) -> list[lease_pb2.SettleResult]:
        """Moves the leases the worker names onto this stream; answers each, in order."""
        answers = [
            lease_pb2.SettleResult(
                task_id=e.task_id, lease_id=e.lease_id, kind=lease_pb2.SETTLE_KIND_RESUME
            )
            for e in entries
        ]
        valid: list[tuple[int, HeldLease]] = []
        for i, entry in enumerate(entries):
            try:
                held = self._tasks.held_lease(f"open.resume[{i}]", entry.task_id, entry.lease_id)
                self._authorizer.require(Role.CONSUME, [held.ref.queue], "resume a lease")
                valid.append((i, held))
            except (InvalidArgument, PermissionDenied) as exc:
                answers[i].outcome = _OUTCOMES[type(exc)]
                answers[i].message = str(exc)
        if not valid:
            return answers
        outcomes = await self._tasks.resume(
            self.stream_id, [held for _, held in valid], self._holder
        )
        resumed = 0
        for (i, held), outcome in zip(valid, outcomes, strict=True):
            answer = answers[i]
            if isinstance(outcome, SettleResult):
                answer.outcome = lease_pb2.SETTLE_OUTCOME_OK
                answer.lease_expire_time.CopyFrom(convert.to_timestamp(outcome.expire_ms))
                self._held[held.lease_id] = held.ref
                self._registry.held(held.lease_id, self)
                resumed += 1
            else:
                self._refuse(answer, outcome)
        log.info("lease stream %s: resumed %d of %d leases", self.stream_id, resumed, len(entries))
        return answers

    async def _abort_invalid(self, field: str, message: str) -> None:
        await self._context.abort_with_status(
            to_status(
                grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", "INVALID_ARGUMENT", field
            )
        )

    def close(self) -> None:
        """Ends the stream with OK (after what is queued is written)."""
        self._outbox.close()

    def drain(self, deadline_ms: int) -> None:
        self._outbox.put_nowait(
            _message(Frame(drain=lease_pb2.Drain(deadline=convert.to_timestamp(deadline_ms))))
        )

    def _fail(self, status: grpc.Status) -> None:
        if self._failure is None:
            self._failure = status
        self._outbox.close()

    # --- writing ------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while (write := await self._outbox.get()) is not None:
            try:
                # A timeout scope, not wait_for: no extra task per write.
                async with asyncio.timeout(self._write_timeout_s):
                    await self._context.write(write.data)
            except TimeoutError:
                # No status can reach a worker that does not read (it would queue behind the
                # stuck data), so the session lets go: its tasks go back to the queue, and the
                # call and its buffers end when the worker goes away or its connection closes
                # (at the latest max_connection_age_s plus its grace later).
                log.warning(
                    "lease stream %s of %r: the worker read nothing for %gs; the stream is cut",
                    self.stream_id,
                    self.worker_id,
                    self._write_timeout_s,
                )
                self._cut = True
                self._outbox.close()  # answers waiting for room give up
                return
            self._unsent.difference_update(write.lease_ids)
            self._outbox.written(write)

    def _can_receive(self) -> bool:
        """More tasks for this stream only while its worker keeps up with reading."""
        return not self._outbox.full

    def _receiving_again(self) -> None:
        if self._sub is not None:
            self._sub.wake()

    def _deliver(self, leases: list[Lease]) -> bool:
        """Called by the queue pump with tasks leased for this stream."""
        if self.closed:
            return False
        lease_ids = [lease.lease_id for lease in leases]
        held, unsent, register = self._held, self._unsent, self._registry.held
        for lease in leases:
            held[lease.lease_id] = lease.task.ref
            register(lease.lease_id, self)
        unsent.update(lease_ids)
        inner = convert.deliveries(leases)
        if len(inner) <= MAX_MESSAGE_BYTES or len(leases) == 1:
            self._outbox.put_nowait(Message("deliveries", inner, lease_ids))
            return True
        # Too large for one frame (large payloads): split, measuring each delivery.
        deliveries: list[lease_pb2.Delivery] = []
        lease_ids, size = [], 0
        for lease in leases:
            delivery = convert.delivery(lease)
            delivery_size = delivery.ByteSize()
            if deliveries and size + delivery_size > MAX_MESSAGE_BYTES:
                self._send_deliveries(deliveries, lease_ids)
                deliveries, lease_ids, size = [], [], 0
            deliveries.append(delivery)
            lease_ids.append(lease.lease_id)
            size += delivery_size
        self._send_deliveries(deliveries, lease_ids)
        return True

    def _send_deliveries(self, deliveries: list[lease_pb2.Delivery], lease_ids: list[str]) -> None:
        inner = lease_pb2.Deliveries(deliveries=deliveries).SerializeToString()
        self._outbox.put_nowait(Message("deliveries", inner, lease_ids))

    def forget(self, lease_id: str) -> None:
        self._held.pop(lease_id, None)
        self._unsent.discard(lease_id)

    @property
    def holding(self) -> bool:
        """Whether the stream still holds leases (shutdown waits for them to settle)."""
        return bool(self._held)

    @property
    def credits(self) -> int:
        """Credits granted and not yet used."""
        return self._sub.credits if self._sub is not None else 0

    @property
    def in_flight(self) -> int:
        """Leases the stream holds."""
        return len(self._held)

    def revoke(self, task_id: str, lease_id: str, reason: str) -> None:
        self.forget(lease_id)
        revoked = lease_pb2.RevokedLease(task_id=task_id, lease_id=lease_id, reason=reason)
        self._outbox.put_nowait(_message(Frame(revoked=lease_pb2.LeasesRevoked(leases=[revoked]))))

    def _hand_back(self) -> None:
        """The stream ended: leases never written to it are undone (no attempt spent); the rest
        wait the resume window for the worker to claim them on a new stream."""
        unsent = [HeldLease(ref, lid) for lid, ref in self._held.items() if lid in self._unsent]
        sent = [HeldLease(ref, lid) for lid, ref in self._held.items() if lid not in self._unsent]
        for lease_id in self._held:
            self._registry.let_go(lease_id, self)
        self._held.clear()
        self._unsent.clear()
        if unsent or sent:
            self._registry.spawn(self._hand_back_leases(unsent, sent))

    async def _hand_back_leases(self, unsent: list[HeldLease], sent: list[HeldLease]) -> None:
        try:
            undone = await self._tasks.unlease(self.stream_id, unsent) if unsent else 0
            detached, _ = await self._tasks.detach(self.stream_id, sent, "lease stream closed")
            log.info(
                "lease stream %s ended: %d unsent tasks back in the queue, %d leases wait %gs "
                "for a resume",
                self.stream_id,
                undone,
                detached,
                self._tasks.settings.resume_window_s,
            )
        except BrokerError as exc:  # they come back when their leases expire instead
            log.warning("lease stream %s: handing back leases failed (%s)", self.stream_id, exc)

    # --- reading ------------------------------------------------------------------------------

    @staticmethod
    def _parse(raw: object) -> lease_pb2.LeaseRequest | None:
        try:
            return lease_pb2.LeaseRequest.FromString(raw)  # type: ignore[arg-type]
        except DecodeError:
            return None

    async def _read(self) -> object:
        """The next frame, read once the client is within its byte rate."""
        if self._meter is None:
            return await self._context.read()
        await self._meter.pause()
        raw = await self._context.read()
        if isinstance(raw, bytes):
            self._meter.charge(len(raw))
        return raw

    async def _read_loop(self) -> None:
        try:
            while True:
                await self._settle_room()  # before each read: a new stream waits its turn too
                if _is_eof(raw := await self._read()):
                    break
                if await self._past_item_limit(raw):
                    return
                request = self._parse(raw)
                if request is None:
                    self._fail_invalid("frame", "not a valid LeaseRequest")
                    return
                self._handle(request)
            # The worker half-closed: no more deliveries; answer what it sent, then end.
            if self._sub is not None:
                self._sub.close()
            if self._settling:
                await asyncio.gather(*self._settling, return_exceptions=True)
            self.close()
        except asyncio.CancelledError:
            raise
        except Exception:  # the transport failed under us: end the stream
            log.debug("lease stream %s: read failed", self.stream_id, exc_info=True)
            self.close()

    async def _past_item_limit(self, raw: object) -> bool:
        """Fails the stream when a large frame holds more settlements than a frame may, counted
        from its bytes before it is parsed: parsing one far past the limit held the event loop
        for tens of milliseconds only to refuse it (broker/api/frame_scan.py)."""
        if not isinstance(raw, bytes) or len(raw) <= frame_scan.SCAN_FROM_BYTES:
            return False
        limit = self._tasks.settings.max_settlements_per_frame
        count = await frame_scan.settlement_count(raw, limit)
        if count is None or count <= limit:
            return False
        self._fail_too_many_items(f"more than {limit}")
        return True

    def _fail_too_many_items(self, count: str) -> None:
        limit = self._tasks.settings.max_settlements_per_frame
        self._fail_invalid(
            "settlements",
            f"{count} acks, nacks and extensions in one frame; at most {limit} "
            "(setting max_settlements_per_frame)",
        )

    def _fail_invalid(self, field: str, message: str) -> None:
        self._fail(
            to_status(
                grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", "INVALID_ARGUMENT", field
            )
        )

    def _handle(self, request: lease_pb2.LeaseRequest) -> None:
        kind = request.WhichOneof("frame")
        if kind == "credit":
            self._credit("credit.credits", request.credit.credits)
        elif kind == "ack":
            self._settle_frames([("ack", request.ack)])
        elif kind == "nack":
            self._settle_frames([("nack", request.nack)])
        elif kind == "extend":
            self._settle_frames([("extend", request.extend)])
        elif kind == "settlements":
            batch = request.settlements
            count = len(batch.acks) + len(batch.nacks) + len(batch.extends)
            limit = self._tasks.settings.max_settlements_per_frame
            if count > limit:
                self._fail_too_many_items(str(count))
                return
            if count:
                settling = self._start_settling(self._settle_batch(batch, count))
                if count > LIGHT_FRAME_ITEMS:
                    self._registry.large_frame_read(self._client, settling)
            if batch.credits:
                self._credit("settlements.credits", batch.credits)
        elif kind == "open":
            self._fail_invalid("open", "sent twice")
        else:
            self._fail_invalid("frame", "empty frame")

    def _credit(self, field: str, n: int) -> None:
        if not 1 <= n <= MAX_CREDITS:
            self._fail_invalid(field, f"must be 1 to {MAX_CREDITS}")
        elif self._sub is not None and self._sub.credits + n > MAX_CREDITS:
            self._fail_invalid(field, f"unused credits would exceed {MAX_CREDITS}")
        else:
            self._grant(n)

    def _grant(self, n: int) -> None:
        if self._dispatcher.draining or self._sub is None:
            return
        self._sub.add_credits(n)

    def _settle_frames(self, frames: list[tuple[str, _SettleFrame]]) -> None:
        groups: dict[tuple[str, str], list[_SettleFrame]] = {}
        for kind, msg in frames:
            groups.setdefault((kind, msg.task_id.rpartition(":")[0]), []).append(msg)
        self._start_settling(self._settle(groups))

    def _start_settling(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def _settle_batch(self, batch: lease_pb2.Settlements, count: int) -> None:
        """Applies a settlements frame. A frame of more than LIGHT_FRAME_ITEMS items waits for
        one of the broker's few lanes for large frames (SessionRegistry.settle_lanes): one
        client's big frames take turns instead of filling the event loop, while the small
        frames of a worker's usual traffic go straight through and keep their group commit."""
        if count <= LIGHT_FRAME_ITEMS:
            await self._group_and_settle(batch, None)
        else:
            async with self._registry.settle_lanes:
                await self._group_and_settle(batch, Pacer(_LANE_SHARE, self._registry.foreground))

    async def _group_and_settle(self, batch: lease_pb2.Settlements, pacer: Pacer | None) -> None:
        """Groups a frame's items by kind and queue, a slice at a time (a large frame does not
        hold the event loop), refuses it whole if it names too many queues, and applies it."""
        groups: dict[tuple[str, str], list[_SettleFrame]] = {}
        parts: tuple[tuple[str, Sequence[_SettleFrame]], ...] = (
            ("ack", batch.acks),
            ("nack", batch.nacks),
            ("extend", batch.extends),
        )
        for kind, messages in parts:
            for start in range(0, len(messages), _SCAN_SLICE):
                for msg in messages[start : start + _SCAN_SLICE]:
                    groups.setdefault((kind, msg.task_id.rpartition(":")[0]), []).append(msg)
                await _pause(pacer)
        queues = len({queue for _, queue in groups})
        limit = self._tasks.settings.max_queues_per_settlements_frame
        if queues > limit:
            self._fail_invalid(
                "settlements",
                f"tasks of {queues} queues in one frame; at most {limit} "
                "(setting max_queues_per_settlements_frame)",
            )
            return
        await self._settle(groups, pacer)

    async def _settle_room(self) -> None:
        """Backpressure: the next frame is not read (the worker's writes wait on HTTP/2 flow
        control) while the stream has its maximum of settlement frames being applied, or its
        client has LARGE_FRAMES_PER_CLIENT large frames not yet applied over all its streams. A
        stream that ends leaves its frames being applied: they still count, so a client that
        cuts its streams and opens new ones cannot pile up work."""
        while len(self._settling) >= self._tasks.settings.max_settle_batches_per_stream:
            await asyncio.wait(set(self._settling), return_when=asyncio.FIRST_COMPLETED)
        await self._registry.large_frame_room(self._client)

    async def _settle(
        self, groups: dict[tuple[str, str], list[_SettleFrame]], pacer: Pacer | None = None
    ) -> None:
        """Applies settlements grouped by kind and queue and answers each (answers match items
        by lease and kind, so each chunk is answered as soon as it is applied).

        Chunks are applied one after the other, each of at most _SETTLE_CHUNK_ITEMS items and
        _SETTLE_CHUNK_GROUPS groups (a script call each), so one frame never holds the event
        loop or the Redis pool for long; a paced frame (pacer) rests between slices."""
        chunk: list[_Group] = []
        items = 0
        for (kind, queue), messages in groups.items():
            start = 0
            while start < len(messages):
                if items == _SETTLE_CHUNK_ITEMS or len(chunk) == _SETTLE_CHUNK_GROUPS:
                    await self._settle_chunk(chunk, pacer)
                    chunk, items = [], 0
                part = messages[start : start + _SETTLE_CHUNK_ITEMS - items]
                chunk.append(_Group(kind, queue, part))
                items += len(part)
                start += len(part)
        if chunk:
            await self._settle_chunk(chunk, pacer)

    async def _settle_chunk(self, groups: list[_Group], pacer: Pacer | None) -> None:
        """Checks a chunk, applies it (a settle call per kind and queue, concurrently), and
        answers it; the Python work is done _CPU_SLICE items at a time, letting others run in
        between. Acks, the bulk of a worker's traffic, go through as columns (ids and lease ids
        in lists, answers written as bytes: settle_wire), with no object per item."""
        answers: list[bytes] = []  # in the chunk's order; b"" until applied
        acks: list[_AckGroup] = []
        others = _Others()
        for group in groups:
            if group.kind == "ack":
                acks.append(await self._check_acks(group, answers, pacer))
            else:
                await self._check_others(group, answers, others, pacer)
        work = [self._apply_acks(group) for group in acks if group.call.lease_ids]
        if others.items:
            work.append(self._apply_others(others))
        if len(work) == 1:
            await work[0]
        elif work:
            await asyncio.gather(*work)
        if pacer is not None:
            pacer.restart()  # the wait on Redis was not this frame's busy time
        done = 0
        for ack_group in acks:
            done = await self._answer_acks(ack_group, answers, done, pacer)
        for n, (i, item, outcome) in enumerate(
            zip(others.positions, others.items, others.outcomes, strict=True)
        ):
            if n and not n % _CPU_SLICE:
                await _pause(pacer)
            answer = others.answers[i]
            self._answer(answer, item, outcome)
            answers[i] = wrap(_RESULTS_FIELD, answer.SerializeToString())
        await self._outbox.put(Message("settle_results", b"".join(answers)))
        if not work or pacer is not None:
            await _pause(pacer)  # an all-invalid chunk still lets others run

    async def _check_acks(
        self, group: _Group, answers: list[bytes], pacer: Pacer | None
    ) -> _AckGroup:
        """Checks a group's acks: the valid ones go into its columns, the others are answered."""
        acks = _AckGroup(group.queue)
        check, holder = self._tasks.check_ack, self._holder
        task_ids, lease_ids, args = acks.task_ids, acks.call.lease_ids, acks.call.args
        for n, msg in enumerate(group.messages):
            if n and not n % _CPU_SLICE:
                await _pause(pacer)
            task_id, lease_id, result = msg.task_id, msg.lease_id, msg.result  # type: ignore[union-attr]
            try:
                _, local_id = check(task_id, lease_id, result)
            except InvalidArgument as exc:
                answers.append(_refusal(task_id, lease_id, _ACK, exc))
                continue
            acks.positions.append(len(answers))
            answers.append(b"")
            task_ids.append(task_id)
            lease_ids.append(lease_id)
            args += (local_id, lease_id, result, holder)
        if task_ids:
            try:
                self._authorizer.require(Role.CONSUME, [group.queue], "ack")
            except PermissionDenied as exc:
                # Each item is refused (and reported) as when they were checked one by one.
                for i, (task_id, lease_id) in enumerate(zip(task_ids, lease_ids, strict=True)):
                    if i:
                        self._authorizer.denied(exc)
                    answers[acks.positions[i]] = _refusal(task_id, lease_id, _ACK, exc)
                return _AckGroup(group.queue)
        return acks

    async def _apply_acks(self, acks: _AckGroup) -> None:
        try:
            acks.statuses = await self._tasks.ack_many(acks.queue, acks.call)
        except BrokerError as exc:
            acks.error = exc
        except Exception:  # a bug: answer "outcome unknown" rather than leave the worker waiting
            log.exception(
                "lease stream %s: settling %d acks failed", self.stream_id, len(acks.task_ids)
            )
            acks.error = BrokerError("internal error; retry")

    async def _answer_acks(
        self, acks: _AckGroup, answers: list[bytes], done: int, pacer: Pacer | None
    ) -> int:
        """Writes the answers of applied acks; a settled (or stale) lease is forgotten.
        Returns the count of answers written so far in the chunk (for pacing)."""
        forget = self._registry.forget
        statuses: Sequence[SettleStatus | None] = acks.statuses or [None] * len(acks.task_ids)
        for i, task_id, lease_id, status in zip(
            acks.positions, acks.task_ids, acks.call.lease_ids, statuses, strict=True
        ):
            if done and not done % _CPU_SLICE:
                await _pause(pacer)
            done += 1
            if status is SettleStatus.OK:
                answers[i] = settle_wire.ok_answer(task_id, lease_id, _ACK_OK)
            elif status is SettleStatus.AGAIN:
                answers[i] = settle_wire.ok_answer(task_id, lease_id, _ACK_AGAIN)
            else:
                error = acks.error if status is None else refusal(task_id, status)
                assert error is not None
                if isinstance(error, ForeignLease):
                    self._authorizer.denied(error)
                answers[i] = _refusal(task_id, lease_id, _ACK, error)
                if not isinstance(error, LeaseStale):
                    continue
            # Settled, or no longer this stream's to settle: forget it.
            forget(lease_id)
            self.forget(lease_id)
        return done

    async def _check_others(
        self, group: _Group, answers: list[bytes], others: _Others, pacer: Pacer | None
    ) -> None:
        """Checks a group of nacks or extensions, one SettleItem each (they are rare)."""
        for n, msg in enumerate(group.messages):
            if n and not n % _CPU_SLICE:
                await _pause(pacer)
            answer = lease_pb2.SettleResult(
                task_id=msg.task_id, lease_id=msg.lease_id, kind=_KINDS[group.kind]
            )
            try:
                item = self._check(group.kind, msg)
            except (InvalidArgument, PermissionDenied) as exc:
                answer.outcome = _OUTCOMES[type(exc)]
                answer.message = str(exc)
                answers.append(wrap(_RESULTS_FIELD, answer.SerializeToString()))
                continue
            others.answers[len(answers)] = answer
            others.positions.append(len(answers))
            others.items.append(item)
            answers.append(b"")

    async def _apply_others(self, others: _Others) -> None:
        try:
            others.outcomes = await self._tasks.settle(others.items)
        except Exception:  # a bug: answer "outcome unknown" rather than leave the worker waiting
            log.exception(
                "lease stream %s: settling %d items failed", self.stream_id, len(others.items)
            )
            others.outcomes = [BrokerError("internal error; retry")] * len(others.items)

    def _check(self, kind: str, msg: _SettleFrame) -> SettleItem:
        """The checked item; InvalidArgument, or PermissionDenied without consume on its queue
        (a stream's open frame names its queues, a settlement may name any task)."""
        item: SettleItem
        if isinstance(msg, lease_pb2.AckRequest):
            item = self._tasks.ack_item(msg.task_id, msg.lease_id, msg.result, self._holder)
        elif isinstance(msg, lease_pb2.NackRequest):
            item = self._tasks.nack_item(
                msg.task_id,
                msg.lease_id,
                msg.error,
                convert.optional_duration_ms(msg, "retry_delay"),
                msg.dead_letter,
                self._holder,
            )
        else:
            item = self._tasks.extend_item(
                msg.task_id,
                msg.lease_id,
                convert.optional_duration_ms(msg, "lease_duration"),
                self._holder,
            )
        self._authorizer.require(Role.CONSUME, [item.ref.queue], kind)
        return item

    def _refuse(self, answer: lease_pb2.SettleResult, error: BrokerError) -> None:
        """An item's refusal; one for another principal's lease goes to the audit trail."""
        if isinstance(error, ForeignLease):
            self._authorizer.denied(error)
        answer.outcome = _OUTCOMES.get(type(error), lease_pb2.SETTLE_OUTCOME_UNAVAILABLE)
        answer.message = str(error)

    def _answer(
        self,
        answer: lease_pb2.SettleResult,
        item: SettleItem,
        outcome: SettleResult | BrokerError,
    ) -> None:
        lease_id = item.lease_id
        if isinstance(outcome, SettleResult):
            answer.outcome = lease_pb2.SETTLE_OUTCOME_OK
            answer.already_settled = outcome.status is SettleStatus.AGAIN
            if isinstance(item, ExtendItem):
                answer.lease_expire_time.CopyFrom(convert.to_timestamp(outcome.expire_ms))
                return
        else:
            self._refuse(answer, outcome)
            if not isinstance(outcome, LeaseStale):
                return
        # Settled, or no longer this stream's to settle: forget it.
        self._registry.forget(lease_id)
        self.forget(lease_id)


#: A settlement as it arrives on the stream.
_SettleFrame: TypeAlias = (
    lease_pb2.AckRequest | lease_pb2.NackRequest | lease_pb2.ExtendLeaseRequest
)


class _Group(NamedTuple):
    """Settlements of one kind on one queue, in one chunk."""

    kind: str
    queue: str
    messages: Sequence[_SettleFrame]


@dataclass(slots=True)
class _AckGroup:
    """A group's valid acks as columns: where each is answered in the chunk, its task id, and
    the lease ids and script arguments handed to the queue."""

    queue: str
    positions: list[int] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)
    call: AckCall = field(default_factory=lambda: AckCall([], []))
    statuses: list[SettleStatus] | None = None
    error: BrokerError | None = None


@dataclass(slots=True)
class _Others:
    """A chunk's valid nacks and extensions: answers by position, items, outcomes."""

    answers: dict[int, lease_pb2.SettleResult] = field(default_factory=dict)
    positions: list[int] = field(default_factory=list)
    items: list[SettleItem] = field(default_factory=list)
    outcomes: list[SettleResult | BrokerError] = field(default_factory=list)


def _refusal(task_id: str, lease_id: str, kind: int, error: BrokerError) -> bytes:
    """A refused settlement's answer as bytes; any error not in _OUTCOMES means "outcome
    unknown, retry"."""
    outcome = _OUTCOMES.get(type(error), lease_pb2.SETTLE_OUTCOME_UNAVAILABLE)
    return settle_wire.answer(task_id, lease_id, kind, outcome, str(error))


#: One chunk of settlements: at most this many items ...
_SETTLE_CHUNK_ITEMS = 256
#: ... of at most this many (kind, queue) groups, each one script call at a time.
_SETTLE_CHUNK_GROUPS = 16
#: Settlements frames larger than this wait for a lane (SessionRegistry.settle_lanes).
LIGHT_FRAME_ITEMS = 1000
#: Large settlements frames applied at once, broker-wide.
SETTLE_LANES = 1
#: Large settlements frames a client may have read and not yet applied, over all its streams.
LARGE_FRAMES_PER_CLIENT = 4
#: A settlements frame is grouped this many items at a time, yielding to others in between.
_SCAN_SLICE = 128
#: Settlements are checked and answered this many at a time, yielding to others in between.
_CPU_SLICE = 32
#: The share of the event loop a large frame in a lane may use (it rests the rest of the time).
_LANE_SHARE = 0.5


async def _pause(pacer: Pacer | None) -> None:
    if pacer is None:
        await asyncio.sleep(0)
    else:
        await pacer.pause()


_ACK = lease_pb2.SETTLE_KIND_ACK
#: The ends of an applied ack's answer (settle_wire.ok_answer), built once.
_ACK_OK = settle_wire.ok_tail(_ACK, already_settled=False)
_ACK_AGAIN = settle_wire.ok_tail(_ACK, already_settled=True)
#: SettleResults.results.
_RESULTS_FIELD = lease_pb2.SettleResults.DESCRIPTOR.fields_by_name["results"].number
_KINDS = {
    "ack": lease_pb2.SETTLE_KIND_ACK,
    "nack": lease_pb2.SETTLE_KIND_NACK,
    "extend": lease_pb2.SETTLE_KIND_EXTEND,
}
#: Settlement errors as in-stream outcomes; any other error means "outcome unknown, retry".
_OUTCOMES: dict[type[BrokerError], lease_pb2.SettleOutcome.ValueType] = {
    LeaseStale: lease_pb2.SETTLE_OUTCOME_LEASE_STALE,
    TaskNotFound: lease_pb2.SETTLE_OUTCOME_NOT_FOUND,
    InvalidArgument: lease_pb2.SETTLE_OUTCOME_INVALID_ARGUMENT,
    PermissionDenied: lease_pb2.SETTLE_OUTCOME_PERMISSION_DENIED,
    ForeignLease: lease_pb2.SETTLE_OUTCOME_PERMISSION_DENIED,
}
