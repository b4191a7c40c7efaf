"""WakeListener: hears every replica's "queue has work" announcements and wakes local pumps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from broker.models import Flow, Revoke, Wake
from broker.subscription import Subscribe, listen_forever

if TYPE_CHECKING:
    from broker.dispatch import Dispatcher
    from broker.queue import TaskQueue


class WakeListener:
    """Subscribes to the wake and revoke channels; reconnects with backoff, and after a reconnect
    wakes every pump, since announcements made while disconnected were lost. (A lost revoke
    costs less: the worker learns at its next extension or ack.)"""

    def __init__(
        self,
        tasks: TaskQueue,
        dispatcher: Dispatcher,
        revoke: Callable[[str, str], None],
        flow: Callable[[str], None] = lambda queue: None,
        reconnected: Callable[[], None] = lambda: None,
    ) -> None:
        self._tasks = tasks
        self._dispatcher = dispatcher
        self._revoke = revoke
        self._flow = flow  # a queue's workflow outbox has entries
        self._reconnected = reconnected  # announcements made while disconnected were lost
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="wake listener")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        subscribe: Subscribe[Wake | Revoke | Flow] = self._tasks.wake_events
        await listen_forever(
            "wake listener", subscribe, self.connected, self._connected, self._event
        )

    def _connected(self) -> None:
        self._dispatcher.notify_all()
        self._reconnected()

    def _event(self, event: Wake | Revoke | Flow) -> None:
        if isinstance(event, Revoke):
            self._revoke(event.task_id, event.lease_id)
        elif isinstance(event, Flow):
            self._flow(event.queue)
        else:
            self._dispatcher.notify(event.queue)
