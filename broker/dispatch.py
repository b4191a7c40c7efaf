"""Dispatcher: pushes leased tasks to Lease streams as they grant credits.

One pump per queue serves every stream subscribed to it, so a thousand streams share one lease
call per queue, not one each. A pump is plain state, not a task: it costs nothing while its queue
has no news. It becomes runnable when something may have changed (an enqueue, a Pub/Sub wake
from any replica, new credits, a stream able to receive again, or its next scheduled task's due
time, kept as one loop timer) and then waits in a FIFO run queue for one of a few lease workers.
So an idle subscribed queue makes no Redis call and holds no timer, at most LEASE_WORKERS lease
calls run at once whatever the number of queues, and queues take turns (a queue with a full
batch goes to the back of the line).

There is no periodic re-check per queue: a wake lost while the Pub/Sub connection was down is
covered by waking every pump when it reconnects (loops/wake_listener.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from broker.cancellation import raise_if_cancelled
from broker.errors import BrokerError, StoreUnavailable
from broker.ids import new_lease_id
from broker.models import HeldLease, Lease, LeaseBatch, LeaseSlot
from broker.queue import TaskQueue

log = logging.getLogger(__name__)

#: Tasks per lease call: 100 keeps one script call around a millisecond (asynq's forwarder bound).
MAX_LEASE_BATCH = 100
#: A lease call after a batch that was not full asks for this many tasks at most; each full
#: batch doubles it up to MAX_LEASE_BATCH. A queue that a wake-up says has "some" work mostly
#: has one or two tasks: reserving every credit would send Redis hundreds of unused slots.
FIRST_LEASE_BATCH = 8
#: An enqueue of at most this many tasks ready now leases for this broker's waiting streams in
#: its own write (reserve_inline): a lone task reaches its worker without waiting for the wake.
#: A larger one leaves them to the pump's rounds, which do not hold up the producer's reply
#: (a lease of 100 tasks inline made the pipeline scenario about 10 % slower).
MAX_INLINE_LEASE = FIRST_LEASE_BATCH
#: Lease calls in flight at once, over all queues: bounds the Redis connections pumps use.
LEASE_WORKERS = 16
#: Longest sleep of a rate-limited pump before it leases again (a settings change shows then).
RATE_RECHECK_S = 1.0
#: Backoff while Redis is unreachable.
RETRY_DELAYS_S = (0.05, 0.1, 0.25, 0.5, 1.0)


def _always() -> bool:
    return True


class Subscription:
    """One Lease stream as the dispatcher sees it: queues, credits and where to deliver.

    Args:
        stream_id: The stream's id, stored with each lease it is given (the task's `sid`).
        holder: The principal the stream's leases are bound to (the task's `lp`; '' without a
            policy): only it may settle, extend or resume them.
        can_receive: False while the stream cannot take more deliveries (its outbox is full):
            pumps skip it until the session calls wake().
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        queues: Sequence[str],
        lease_ms: int,
        deliver: Callable[[list[Lease]], bool],
        stream_id: str = "",
        can_receive: Callable[[], bool] = _always,
        holder: str = "",
    ) -> None:
        self._dispatcher = dispatcher
        self.holder = holder
        self.queues = tuple(queues)
        self.lease_ms = lease_ms
        self.credits = 0  # granted and not yet used or reserved by a pump
        self.deliver = deliver
        self.stream_id = stream_id
        self.can_receive = can_receive
        self.active = True

    def add_credits(self, n: int) -> None:
        self.credits += n
        self._dispatcher.credits_changed(self)

    def credits_returned(self) -> None:
        if self.active:
            self._dispatcher.credits_changed(self)

    def wake(self) -> None:
        """The session can receive again (can_receive turned True): its queues' pumps look."""
        if self.active:
            self._dispatcher.credits_changed(self)

    def close(self) -> None:
        """Stops deliveries; a pump holding a reservation gives it back to nobody."""
        self.active = False
        self._dispatcher.unsubscribe(self)


class InlineLease:
    """Credits a queue's pump set aside for a lease sent with an enqueue (reserve_inline):
    `slots` go to the lease script, and `leased` hands out its reply (or gives the credits
    back). Exactly one call of `leased` per reservation."""

    __slots__ = ("_dispatcher", "_pump", "_subs", "slots")

    def __init__(self, dispatcher: Dispatcher, pump: QueuePump, subs: list[Subscription]) -> None:
        self._dispatcher = dispatcher
        self._pump = pump
        self._subs = subs
        self.slots = Dispatcher._slot_args(subs)

    def leased(self, batch: LeaseBatch | Exception | None) -> None:
        """The lease's reply; an error or None (not sent) gives the credits back."""
        self._dispatcher._inline_leased(self._pump, self._subs, batch)


class QueuePump:
    """The lease state of one queue for the subscriptions that have credits."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.subscribers: list[Subscription] = []
        self.may_have_work = True  # cleared before each lease call, set by any wake
        self.due = False  # the next scheduled task's time (or the rate limit's token) has come
        #: The rate limit held tasks back: wakes are ignored until the timer marks it due (a
        #: busy producer's every enqueue would otherwise cost a lease call that finds no token).
        self.resting = False
        self.timer: asyncio.TimerHandle | None = None  # fires at that time
        self.queued = False  # in the run queue
        self.running = False  # a lease call is in flight
        self.retired = False  # no subscribers left
        self.failures = 0
        self.rr = 0  # round-robin start, so streams share a scarce queue fairly
        self.batch = FIRST_LEASE_BATCH  # slots for the next lease call (see FIRST_LEASE_BATCH)

    def ready(self) -> list[Subscription]:
        return [s for s in self.subscribers if s.active and s.credits > 0 and s.can_receive()]

    def wants_lease(self) -> bool:
        news = self.due or (self.may_have_work and not self.resting)
        return not self.retired and news and bool(self.ready())

    def set_timer(self, handle: asyncio.TimerHandle | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = handle


class Dispatcher:
    """Owns the pumps, the run queue and the lease workers; Lease sessions subscribe here."""

    def __init__(self, task_queue: TaskQueue, workers: int = LEASE_WORKERS) -> None:
        self._tasks = task_queue
        self._pumps: dict[str, QueuePump] = {}
        #: Pumps waiting for a lease worker. A queue wakes one waiting worker per pump (an
        #: Event would wake every idle worker for each kick, only for all but one to sleep again).
        self._runnable: asyncio.Queue[QueuePump] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._worker_count = workers
        self._background: set[asyncio.Task[None]] = set()
        self.draining = False

    def subscribe(
        self,
        queues: Sequence[str],
        lease_ms: int,
        deliver: Callable[[list[Lease]], bool],
        *,
        stream_id: str = "",
        can_receive: Callable[[], bool] = _always,
        holder: str = "",
    ) -> Subscription:
        if not self._workers:
            self._workers = [
                # A fresh context: the workers serve every stream, not the principal of the
                # call that happened to start them.
                asyncio.create_task(
                    self._work(), name=f"lease worker {i}", context=contextvars.Context()
                )
                for i in range(self._worker_count)
            ]
        sub = Subscription(self, queues, lease_ms, deliver, stream_id, can_receive, holder)
        for queue in sub.queues:
            pump = self._pumps.get(queue)
            if pump is None:
                pump = self._pumps[queue] = QueuePump(queue)
            pump.subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        for queue in sub.queues:
            pump = self._pumps.get(queue)
            if pump and sub in pump.subscribers:
                pump.subscribers.remove(sub)
                if not pump.subscribers:
                    del self._pumps[queue]
                    pump.retired = True
                    pump.set_timer(None)

    def credits_changed(self, sub: Subscription) -> None:
        if self.draining:
            return
        for queue in sub.queues:
            if pump := self._pumps.get(queue):
                self._kick(pump)

    def notify(self, queue: str) -> None:
        """Queue may have new work (an enqueue, a retry, a reclaim, a resume)."""
        if pump := self._pumps.get(queue):
            pump.may_have_work = True
            self._kick(pump)

    def notify_all(self) -> None:
        """Wakes every pump, after a Pub/Sub reconnect in which wakes may have been missed."""
        for pump in self._pumps.values():
            pump.may_have_work = True
            self._kick(pump)

    def drain(self) -> None:
        """No more deliveries to anyone."""
        self.draining = True
        for pump in self._pumps.values():
            for sub in pump.subscribers:
                sub.credits = 0

    async def stop(self) -> None:
        for pump in self._pumps.values():
            pump.set_timer(None)
        self._pumps.clear()
        self._runnable = asyncio.Queue()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # --- the run queue ----------------------------------------------------------------------

    def _kick(self, pump: QueuePump) -> None:
        """Puts a pump in the run queue if it has reason to lease and is not there already."""
        if pump.queued or pump.running or not pump.wants_lease():
            return
        pump.queued = True
        self._runnable.put_nowait(pump)

    async def _work(self) -> None:
        while True:
            raise_if_cancelled()
            pump = await self._runnable.get()
            pump.queued = False
            if not pump.wants_lease():
                continue
            pump.running = True
            try:
                await self._lease_round(pump)
            except Exception:  # a bug: keep this worker serving the other queues
                raise_if_cancelled()
                log.exception("queue %s: lease round failed", pump.queue)
                self._retry_later(pump, 1.0)
            finally:
                pump.running = False
            self._kick(pump)  # a full batch, or news that came during the call: back in line

    async def _lease_round(self, pump: QueuePump) -> None:
        pump.may_have_work = False
        pump.due = False
        pump.resting = False
        try:
            await self._lease_for(pump, pump.ready())
            pump.failures = 0
        except StoreUnavailable as exc:
            raise_if_cancelled()
            delay = RETRY_DELAYS_S[min(pump.failures, len(RETRY_DELAYS_S) - 1)]
            pump.failures += 1
            log.warning("queue %s: lease failed (%s); retrying in %.2fs", pump.queue, exc, delay)
            self._retry_later(pump, delay)
        except BrokerError:
            raise_if_cancelled()
            log.exception("queue %s: lease failed", pump.queue)
            self._retry_later(pump, 1.0)

    def _retry_later(self, pump: QueuePump, delay: float) -> None:
        def again() -> None:
            pump.may_have_work = True
            self._kick(pump)

        pump.set_timer(asyncio.get_running_loop().call_later(delay, again))

    def _due_later(self, pump: QueuePump, delay: float) -> None:
        def due() -> None:
            pump.timer = None
            pump.due = True
            self._kick(pump)

        pump.set_timer(asyncio.get_running_loop().call_later(delay, due))

    # --- one lease call -----------------------------------------------------------------------

    @staticmethod
    def _reserve(pump: QueuePump, ready: list[Subscription], limit: int) -> list[Subscription]:
        """Takes credits round-robin, one slot per task to lease, up to `limit`. A stream on
        several queues lends each queue a share, so one busy queue cannot starve the others."""
        slots: list[Subscription] = []
        shares = {id(s): max(1, s.credits // len(s.queues)) for s in ready}
        start = pump.rr % len(ready)
        pump.rr += 1
        order = ready[start:] + ready[:start]
        while len(slots) < limit:
            progressed = False
            for sub in order:
                if shares[id(sub)] > 0 and sub.credits > 0 and len(slots) < limit:
                    shares[id(sub)] -= 1
                    sub.credits -= 1
                    slots.append(sub)
                    progressed = True
            if not progressed:
                break
        return slots

    @staticmethod
    def _give_back(slots: list[Subscription]) -> None:
        """Returns unused reserved credits, and tells the streams' other queues: while this
        pump held the credits, they saw none and went idle."""
        for sub in slots:
            sub.credits += 1
        for sub in {id(s): s for s in slots}.values():
            sub.credits_returned()

    @staticmethod
    def _slot_args(slots: list[Subscription]) -> list[LeaseSlot]:
        return [(new_lease_id(), sub.lease_ms, sub.stream_id, sub.holder) for sub in slots]

    async def _lease_for(self, pump: QueuePump, ready: list[Subscription]) -> None:
        if not ready:
            return
        slots = self._reserve(pump, ready, pump.batch)
        try:
            batch = await self._tasks.lease(pump.queue, self._slot_args(slots))
        except BaseException:
            self._give_back(slots)
            raise
        self._hand_out(pump, slots, batch)
        if len(batch.leases) == len(slots) and not batch.paused:
            pump.batch = min(MAX_LEASE_BATCH, pump.batch * 2)
        else:
            pump.batch = FIRST_LEASE_BATCH

    def _hand_out(self, pump: QueuePump, slots: list[Subscription], batch: LeaseBatch) -> None:
        """Delivers a lease call's tasks to the streams whose slots they fill, gives the unused
        slots back, and notes what the call learned of the queue: a full batch may have more
        behind it; the rate limit and the next scheduled task set the pump's timer."""
        loop = asyncio.get_running_loop()
        received = loop.time()
        per_sub: dict[int, tuple[Subscription, list[Lease]]] = {}
        unused = slots[len(batch.leases) :]
        for i, (sub, lease) in enumerate(zip(slots, batch.leases, strict=False)):
            if i in batch.gone:
                unused.append(sub)
            else:
                per_sub.setdefault(id(sub), (sub, []))[1].append(lease)
        self._give_back(unused)
        for sub, leases in per_sub.values():
            if not (sub.active and sub.deliver(leases)):
                self._release_orphans(sub.stream_id, leases)
        if len(batch.leases) == len(slots) and not batch.paused:
            pump.may_have_work = True  # a full batch: there may be more
        if batch.rate_limited:
            pump.resting = True
        if batch.next_due_ms is not None and not pump.retired:
            delay = max(0, batch.next_due_ms - batch.now_ms) / 1000
            if batch.rate_limited:
                # A slow rate's next token may be far off: look again within a second, so a
                # limit raised or lifted meanwhile applies as fast on every replica.
                delay = min(delay, RATE_RECHECK_S)
            self._due_later(pump, max(0.0, received + delay - loop.time()))

    # --- a lease sent with an enqueue ---------------------------------------------------------

    def reserve_inline(self, queue: str, ready_tasks: Callable[[], int]) -> InlineLease | None:
        """Credits for a lease sent in the same write as an enqueue of `ready_tasks()` tasks
        ready now (TaskQueue), taken from the queue's streams as a pump's round takes them;
        None when no stream here can take a task of the queue, or for more than
        MAX_INLINE_LEASE tasks. The enqueue still wakes every replica."""
        pump = self._pumps.get(queue)
        if self.draining or pump is None or pump.retired or pump.resting:
            return None
        ready = pump.ready()
        if not ready:
            return None
        tasks = ready_tasks()
        if not 0 < tasks <= MAX_INLINE_LEASE:
            return None
        # One slot more than the tasks stored: a lease that fills it has found a backlog, and
        # the pump's own round goes on with it; one that does not leaves no round to make.
        slots = self._reserve(pump, ready, tasks + 1)
        return InlineLease(self, pump, slots)

    def _inline_leased(
        self, pump: QueuePump, slots: list[Subscription], batch: LeaseBatch | Exception | None
    ) -> None:
        if isinstance(batch, LeaseBatch):
            self._hand_out(pump, slots, batch)
        else:  # not sent, or failed: the pump's own round looks instead
            self._give_back(slots)
            pump.may_have_work = True
        self._kick(pump)

    def _release_orphans(self, stream_id: str, leases: list[Lease]) -> None:
        """Leases made for a stream that went away before they were handed to it: undone, no
        attempt spent (the task never left the broker)."""
        held = [HeldLease(lease.task.ref, lease.lease_id) for lease in leases]
        self._spawn(self._unlease(stream_id, held))

    async def _unlease(self, stream_id: str, held: list[HeldLease]) -> None:
        try:
            await self._tasks.unlease(stream_id, held)
        except BrokerError as exc:  # the leases expire and are reclaimed instead
            log.warning("could not hand back %d undelivered leases: %s", len(held), exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
