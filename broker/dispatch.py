"""Dispatcher: pushes leased tasks to Lease streams as they grant credits.

One pump per queue serves every stream subscribed to it, so a thousand streams share one
lease call per queue (and one Redis connection), not one each. A pump leases in batches up to the
credits its streams hold, then sleeps until something may have changed: an enqueue (local, or a
Pub/Sub wake from any replica), new credits, or the next scheduled task's due time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeAlias

from broker.cancellation import raise_if_cancelled
from broker.errors import BrokerError, StoreUnavailable
from broker.ids import new_lease_id
from broker.models import HeldLease, Lease
from broker.queue import TaskQueue

log = logging.getLogger(__name__)

#: Tasks per lease call: 100 keeps one script call around a millisecond (asynq's forwarder bound).
MAX_LEASE_BATCH = 100
#: A pump with credits but no news re-checks this often, in case a Pub/Sub wake was lost.
SAFETY_RECHECK_S = 30.0
#: Backoff while Redis is unreachable.
RETRY_DELAYS_S = (0.05, 0.1, 0.25, 0.5, 1.0)


class Subscription:
    """One Lease stream as the dispatcher sees it: queues, credits and where to deliver."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        stream_id: str,
        queues: Sequence[str],
        lease_ms: int,
        deliver: Callable[[list[Lease]], bool],
        can_receive: Callable[[], bool],
    ) -> None:
        self._dispatcher = dispatcher
        self.stream_id = stream_id
        self.queues = tuple(queues)
        self.lease_ms = lease_ms
        self.credits = 0  # granted and not yet used or reserved by a pump
        self.deliver = deliver
        #: False while the stream's worker is not reading what was already sent to it.
        self.can_receive = can_receive
        self.active = True

    def add_credits(self, n: int) -> None:
        self.credits += n
        self._dispatcher.credits_changed(self)

    def credits_returned(self) -> None:
        if self.active:
            self._dispatcher.credits_changed(self)

    def receiving_again(self) -> None:
        """The stream's worker caught up with its outbox: its credits count again."""
        if self.active:
            self._dispatcher.credits_changed(self)

    def close(self) -> None:
        """Stops deliveries; a pump holding a reservation gives it back to nobody."""
        self.active = False
        self._dispatcher.unsubscribe(self)


class QueuePump:
    """Leases tasks of one queue for the subscriptions that have credits."""

    def __init__(self, queue: str, task_queue: TaskQueue, on_orphans: _Orphans) -> None:
        self.queue = queue
        self._tasks = task_queue
        self._on_orphans = on_orphans
        self.subscribers: list[Subscription] = []
        self._wake = asyncio.Event()
        self._may_have_work = True  # cleared before each lease call, set by any wake
        self._due_at: float | None = None  # monotonic time of the next scheduled task
        self._runner: asyncio.Task[None] | None = None
        self._retired = False
        self._rr = 0  # round-robin start, so streams share a scarce queue fairly

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name=f"pump {self.queue}")

    def retire(self) -> None:
        """Stops after the lease call in flight, if any, so its tasks are handed back rather
        than left leased until they expire."""
        self._retired = True
        self._wake.set()

    async def stop(self) -> None:
        if self._runner:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)

    def notify(self, work: bool = True) -> None:
        """Something changed: new work (work=True) or new credits."""
        if work:
            self._may_have_work = True
        self._wake.set()

    def _ready(self) -> list[Subscription]:
        return [s for s in self.subscribers if s.active and s.credits > 0 and s.can_receive()]

    async def _run(self) -> None:
        failures = 0
        while not self._retired:
            raise_if_cancelled()
            ready = self._ready()
            due = self._due_at is not None and time.monotonic() >= self._due_at
            if not ready or not (self._may_have_work or due):
                await self._sleep()
                continue
            self._may_have_work = False
            self._due_at = None
            try:
                await self._lease_for(ready)
                failures = 0
            except StoreUnavailable as exc:
                raise_if_cancelled()
                self._may_have_work = True
                delay = RETRY_DELAYS_S[min(failures, len(RETRY_DELAYS_S) - 1)]
                failures += 1
                log.warning(
                    "queue %s: lease failed (%s); retrying in %.2fs", self.queue, exc, delay
                )
                await asyncio.sleep(delay)
            except BrokerError:
                raise_if_cancelled()
                log.exception("queue %s: lease failed", self.queue)
                self._may_have_work = True
                await asyncio.sleep(1.0)

    async def _sleep(self) -> None:
        timeout = SAFETY_RECHECK_S
        if self._due_at is not None:
            timeout = max(0.0, min(timeout, self._due_at - time.monotonic()))
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            if self._due_at is None:
                self._may_have_work = True  # the safety re-check

    def _reserve(self, ready: list[Subscription]) -> list[Subscription]:
        """Takes credits round-robin, one slot per task to lease. A stream on several queues
        lends each queue a share, so one busy queue cannot starve the others."""
        slots: list[Subscription] = []
        shares = {id(s): max(1, s.credits // len(s.queues)) for s in ready}
        start = self._rr % len(ready)
        self._rr += 1
        order = ready[start:] + ready[:start]
        while len(slots) < MAX_LEASE_BATCH:
            progressed = False
            for sub in order:
                if shares[id(sub)] > 0 and sub.credits > 0 and len(slots) < MAX_LEASE_BATCH:
                    shares[id(sub)] -= 1
                    sub.credits -= 1
                    slots.append(sub)
                    progressed = True
            if not progressed:
                break
        return slots

    def _give_back(self, slots: list[Subscription]) -> None:
        """Returns unused reserved credits, and tells the streams' other queues: while this
        pump held the credits, they saw none and went to sleep."""
        for sub in slots:
            sub.credits += 1
        for sub in {id(s): s for s in slots}.values():
            sub.credits_returned()

    async def _lease_for(self, ready: list[Subscription]) -> None:
        slots = self._reserve(ready)
        try:
            batch = await self._tasks.lease(
                self.queue, [(new_lease_id(), sub.lease_ms, sub.stream_id) for sub in slots]
            )
        except BaseException:
            self._give_back(slots)
            raise
        received = time.monotonic()
        per_sub: dict[int, tuple[Subscription, list[Lease]]] = {}
        for sub, lease in zip(slots, batch.leases, strict=False):
            per_sub.setdefault(id(sub), (sub, []))[1].append(lease)
        self._give_back(slots[len(batch.leases) :])
        for sub, leases in per_sub.values():
            if not (sub.active and sub.deliver(leases)):
                self._on_orphans(sub.stream_id, leases)
        if len(batch.leases) == len(slots) and not batch.paused:
            self._may_have_work = True  # a full batch: there may be more
        if batch.next_due_ms >= 0:
            self._due_at = received + max(0, batch.next_due_ms - batch.now_ms) / 1000


#: Type of the callback that gives back leases whose stream went away mid-delivery.
_Orphans: TypeAlias = Callable[[str, list[Lease]], None]


class Dispatcher:
    """Owns the pumps and the subscriptions; Lease sessions subscribe here."""

    def __init__(self, task_queue: TaskQueue) -> None:
        self._tasks = task_queue
        self._pumps: dict[str, QueuePump] = {}
        self._retiring: set[QueuePump] = set()  # finishing their last lease call
        self._background: set[asyncio.Task[None]] = set()
        self.draining = False

    def subscribe(
        self,
        stream_id: str,
        queues: Sequence[str],
        lease_ms: int,
        deliver: Callable[[list[Lease]], bool],
        can_receive: Callable[[], bool],
    ) -> Subscription:
        sub = Subscription(self, stream_id, queues, lease_ms, deliver, can_receive)
        for queue in sub.queues:
            pump = self._pumps.get(queue)
            if pump is None:
                pump = self._pumps[queue] = QueuePump(queue, self._tasks, self._release_orphans)
                pump.start()
            pump.subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        for queue in sub.queues:
            pump = self._pumps.get(queue)
            if pump and sub in pump.subscribers:
                pump.subscribers.remove(sub)
                if not pump.subscribers:
                    del self._pumps[queue]
                    pump.retire()
                    self._retiring.add(pump)

    def credits_changed(self, sub: Subscription) -> None:
        if self.draining:
            return
        for queue in sub.queues:
            if pump := self._pumps.get(queue):
                pump.notify(work=False)

    def notify(self, queue: str) -> None:
        """Queue may have new work (an enqueue, a retry, a reclaim, a resume)."""
        if pump := self._pumps.get(queue):
            pump.notify()

    def notify_all(self) -> None:
        """Wakes every pump, after a Pub/Sub reconnect in which wakes may have been missed."""
        for pump in self._pumps.values():
            pump.notify()

    def drain(self) -> None:
        """No more deliveries to anyone."""
        self.draining = True
        for pump in self._pumps.values():
            for sub in pump.subscribers:
                sub.credits = 0

    async def stop(self) -> None:
        pumps = [*self._pumps.values(), *self._retiring]
        self._pumps.clear()
        self._retiring.clear()
        await asyncio.gather(*(p.stop() for p in pumps))
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

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
