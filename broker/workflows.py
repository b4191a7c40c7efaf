"""OutboxMover: carries each queue's workflow outbox to the tasks it concerns (issue 17).

Parents and children may live in different queues, so different Redis Cluster slots: no one
script can end a parent and release its child. A task that ends appends an entry to its own
queue's outbox in the same script (prelude's task_finished); a task enqueued WAITING appends a
link request to its queue's. Any replica's mover then runs one script per slot for each entry
(link.lua in the parent's, resolve.lua in the children's), each idempotent (a child records
each parent's end once), and deletes the entry only after every step succeeded. A mover that
dies, or two replicas moving the same entry, neither lose nor repeat a release.

Who moves what: every script that appends publishes the queue on tb:flow; each replica's wake
listener kicks its mover, which claims the queue's outbox (a short-lived key) so one replica
drains it while others skip. The claim also sets the queue's due-index entry, so if its holder
dies the maintainer finds the entries (maintain.lua reports them) and kicks a mover again.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import Final

from broker.cancellation import raise_if_cancelled
from broker.errors import BrokerError, InvalidArgument
from broker.ids import parse_task_id
from broker.models import Hint, TaskRef, TaskState
from broker.store.redis_store import RedisStore
from broker.store.workflow_store import OutboxEntry, Tell, WorkflowStore

log = logging.getLogger(__name__)

#: Outbox entries read per step.
READ_BATCH: Final = 100
#: Tells per resolve.lua call, and their results' bytes at most (a script call holds its
#: arguments in Redis's memory at once).
RESOLVE_BATCH: Final = 500
RESOLVE_BYTES: Final = 4 * 1024 * 1024
#: Parents linked at once for one child.
LINK_CONCURRENCY: Final = 64
#: How long a claim on a queue's outbox lasts; a drain renews it per batch.
CLAIM_MS: Final = 5000
#: Queues drained at once by one process: many queues kicked together (a sweep, a burst of
#: workflows over 100,000 queues) wait their turn rather than take every Redis connection.
MAX_CONCURRENT_DRAINS: Final = 16


class OutboxMover:
    """Drains queues' outboxes when kicked; at most one drain per queue in this process."""

    def __init__(self, store: RedisStore, workflow: WorkflowStore) -> None:
        self._store = store
        self._workflow = workflow
        self._owner = f"{os.getpid()}-{os.urandom(6).hex()}"
        self._running: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_DRAINS)
        self._stopped = False
        self.moved = 0  # entries moved by this process (tests, metrics)

    def kick(self, queue: str) -> None:
        """Drains the queue's outbox soon (again after the current drain, if one runs). After
        stop, nothing: another replica, or this one restarted, moves it."""
        if self._stopped:
            return
        if queue in self._running:
            self._again.add(queue)
            return
        self._running[queue] = asyncio.create_task(self._drain_until_quiet(queue))

    async def stop(self) -> None:
        self._stopped = True
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def idle(self) -> None:
        """Waits until no drain runs in this process (tests)."""
        while self._running:
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    async def _drain_until_quiet(self, queue: str) -> None:
        try:
            async with self._slots:
                while True:
                    self._again.discard(queue)
                    await self.drain(queue)
                    if queue not in self._again:
                        return
        except asyncio.CancelledError:
            raise
        except BrokerError as exc:  # the maintainer kicks again while entries remain
            raise_if_cancelled()
            log.warning("workflow outbox of queue %s not moved yet: %s", queue, exc)
        except Exception as exc:  # a script error (no task data in it): the same, loudly
            raise_if_cancelled()
            log.error("workflow outbox of queue %s failed to move: %r", queue, exc)
        finally:
            self._running.pop(queue, None)

    async def drain(self, queue: str) -> int:
        """Moves the queue's outbox entries until it is empty, if this process wins the claim.
        Returns how many entries were moved."""
        wf = self._workflow
        if not await wf.claim_outbox(queue, self._owner, CLAIM_MS):
            return 0
        moved = 0
        try:
            # Should this process die mid-drain, the maintainer looks at the queue once the
            # claim has lapsed, and finds the entries left.
            await self._store.hint([Hint(queue, delay_ms=CLAIM_MS)])
            while entries := await wf.read_outbox(queue, READ_BATCH):
                await self._tell(await self._tells(queue, entries))
                await wf.delete_outbox(queue, entries)
                moved += len(entries)
                await wf.claim_outbox(queue, self._owner, CLAIM_MS)  # renews only if lapsed
        finally:
            await wf.release_outbox(queue, self._owner)
        self.moved += moved
        return moved

    async def _tells(self, queue: str, entries: Sequence[OutboxEntry]) -> list[Tell]:
        """What a batch of entries asks to tell, after linking the children it asks to link."""
        tells: list[Tell] = []
        for entry in entries:
            if entry.kind == "l":
                tells += await self._link(TaskRef(queue, entry.task))
                continue
            assert entry.state is not None  # an end entry always names its state
            parent = TaskRef(queue, entry.task)
            children = entry.children
            if children is None:  # over 1,000: copied beside the entry
                children = tuple(await self._workflow.copied_children(queue, entry.entry_id))
            for child in children:
                try:
                    ref = parse_task_id("child", child)
                except InvalidArgument:  # only a hand-edited entry: skipped, not retried forever
                    log.warning(
                        "workflow outbox of %s names %r, not a task id: skipped", queue, child
                    )
                    continue
                tells.append(
                    Tell(
                        ref.queue,
                        ref.local_id,
                        parent.task_id,
                        entry.state,
                        entry.type,
                        entry.result,
                    )
                )
        return tells

    async def _link(self, child: TaskRef) -> list[Tell]:
        """Links a WAITING child to each of its parents. A parent that ended already is
        returned as a tell for the child; one gone (trimmed) counts as CANCELLED."""
        parents = await self._workflow.parents_of(child)
        tells: list[Tell] = []
        for start in range(0, len(parents), LINK_CONCURRENCY):
            chunk = parents[start : start + LINK_CONCURRENCY]
            linked = await asyncio.gather(
                *(self._workflow.link(parent, child.task_id) for parent in chunk)
            )
            for parent, (outcome, state, result, parent_type) in zip(chunk, linked, strict=True):
                if outcome == "ended" and state is not None:
                    tells.append(
                        Tell(child.queue, child.local_id, parent, state, parent_type, result)
                    )
                elif outcome == "gone":
                    tells.append(
                        Tell(child.queue, child.local_id, parent, TaskState.CANCELLED, "", b"")
                    )
        return tells

    async def _tell(self, tells: Sequence[Tell]) -> None:
        """resolve.lua once per children's queue, in chunks of RESOLVE_BATCH tells or
        RESOLVE_BYTES of results."""
        by_queue: dict[str, list[Tell]] = {}
        for t in tells:
            by_queue.setdefault(t.queue, []).append(t)
        for child_queue, queued in by_queue.items():
            chunk: list[Tell] = []
            size = 0
            for t in queued:
                chunk.append(t)
                size += len(t.result)
                if len(chunk) >= RESOLVE_BATCH or size >= RESOLVE_BYTES:
                    await self._resolve(child_queue, chunk)
                    chunk, size = [], 0
            if chunk:
                await self._resolve(child_queue, chunk)

    async def _resolve(self, child_queue: str, tells: Sequence[Tell]) -> None:
        outcomes = await self._workflow.resolve(child_queue, tells)
        due = [int(o[4:]) for o in outcomes if o.startswith("due:")]
        if due:  # released into scheduled: the maintainer promotes them then
            await self._store.hint([Hint(child_queue, at_ms=min(due))])
        if "cancel" in outcomes:  # their own children hear through their queue's outbox
            self.kick(child_queue)

    async def sweep(self) -> int:
        """Kicks every registered queue that has outbox entries: after the wake listener
        reconnects, since tb:flow announcements made meanwhile were lost. Returns how many."""
        found = 0
        cursor = 0
        while True:
            cursor, queues = await self._store.scan_queues(cursor, 1000)
            lengths = await self._workflow.outbox_lengths(queues)
            for queue, length in zip(queues, lengths, strict=True):
                if length > 0:
                    self.kick(queue)
                    found += 1
            if cursor == 0:
                return found
