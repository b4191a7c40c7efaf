"""WatchHub: what WatchTask streams watch with. One Pub/Sub subscription per broker process
hears the finish of every watched task (keys.py FINISHED_CHANNEL) and wakes the streams
watching it; each stream also reads its task again on a timer, which catches the changes no
event announces (pending to leased, a retry) and any announcement lost with a connection.

A watcher first sets `w` on its task's hash (TaskQueue.mark_watched), then reads the task: a
finish after the mark is announced, one before it is seen by the read. A fresh task has no
hash to mark; its first transition makes one, and the watcher marks it at its next read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from broker.errors import Draining, LimitExceeded
from broker.models import FINISHED_STATES, Task, TaskState
from broker.subscription import listen_forever

if TYPE_CHECKING:
    from broker.queue import TaskQueue

log = logging.getLogger(__name__)


class _Watcher:
    """One watching stream: woken when its task's finish is announced, or the hub drains."""

    __slots__ = ("task_id", "woken")

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.woken = asyncio.Event()


class WatchHub:
    """The watchers of one broker process, by task id, and the subscription that wakes them.

    Args:
        tasks: Where tasks are read and marked.
        max_watchers: Watchers at once; one more is refused (LimitExceeded).
        poll_initial_s: The first interval between two reads of a task that did not change;
            it doubles while nothing changes, up to poll_max_s, and starts again on a change.
        poll_max_s: The longest interval between two reads.
    """

    def __init__(
        self, tasks: TaskQueue, max_watchers: int, poll_initial_s: float, poll_max_s: float
    ) -> None:
        self._tasks = tasks
        self._max_watchers = max_watchers
        self._poll_initial_s = poll_initial_s
        self._poll_max_s = poll_max_s
        self._by_task: dict[str, set[_Watcher]] = {}
        self._run_task: asyncio.Task[None] | None = None
        self.watching = 0
        self.draining = False
        #: Set while the subscription is up (tests wait for it).
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._run_task = asyncio.create_task(self._run(), name="watch hub")

    async def stop(self) -> None:
        if self._run_task:
            self._run_task.cancel()
            await asyncio.gather(self._run_task, return_exceptions=True)

    def drain(self) -> None:
        """Ends every watch (Draining: UNAVAILABLE, so clients watch through another replica)
        and refuses new ones."""
        self.draining = True
        self._wake_all()

    async def watch(self, task_id: str) -> AsyncGenerator[Task]:
        """Yields the task as it is now, then again each time its state or attempt changes,
        and returns after a finished state. Close it (contextlib.aclosing) to stop watching.

        Raises:
            InvalidArgument: the id is malformed.
            TaskNotFound: no such task (or it was deleted while watched).
            LimitExceeded: max_watchers are watching.
            Draining: the broker is shutting down.
            StoreUnavailable: Redis could not be reached.
        """
        self._tasks.ref("task_id", task_id)  # a malformed id is INVALID_ARGUMENT, first
        if self.draining:
            raise Draining("the broker is shutting down; watch through another replica")
        if self.watching >= self._max_watchers:
            raise LimitExceeded(
                f"the broker serves its maximum of {self._max_watchers} WatchTask streams "
                "(setting max_watchers); retry later or use another replica"
            )
        watcher = self._add(task_id)
        try:
            marked = False
            last: tuple[TaskState, int] | None = None
            interval_s = self._poll_initial_s
            while True:
                watcher.woken.clear()  # before the read: a wake during it is not lost
                if not marked:
                    marked = await self._tasks.mark_watched(task_id)
                task = await self._tasks.get(task_id)
                seen = (task.state, task.attempt)
                if seen != last:
                    last, interval_s = seen, self._poll_initial_s
                    yield task
                    if task.state in FINISHED_STATES:
                        return
                else:
                    interval_s = min(interval_s * 2, self._poll_max_s)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval_s):
                        await watcher.woken.wait()
                if self.draining:
                    raise Draining("the broker is shutting down; watch through another replica")
        finally:
            self._remove(watcher)

    def _add(self, task_id: str) -> _Watcher:
        watcher = _Watcher(task_id)
        self._by_task.setdefault(task_id, set()).add(watcher)
        self.watching += 1
        return watcher

    def _remove(self, watcher: _Watcher) -> None:
        watchers = self._by_task.get(watcher.task_id)
        if watchers is None or watcher not in watchers:
            return
        watchers.discard(watcher)
        if not watchers:
            del self._by_task[watcher.task_id]
        self.watching -= 1

    def _wake(self, task_id: str) -> None:
        for watcher in self._by_task.get(task_id, ()):
            watcher.woken.set()

    def _wake_all(self) -> None:
        for watchers in self._by_task.values():
            for watcher in watchers:
                watcher.woken.set()

    async def _run(self) -> None:
        """Listens for finished tasks; after a reconnect wakes every watcher, since
        announcements made while disconnected were lost."""
        await listen_forever(
            "watch hub", self._tasks.finished_events, self.connected, self._wake_all, self._wake
        )
