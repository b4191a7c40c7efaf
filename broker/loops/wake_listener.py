"""WakeListener: hears every replica's "queue has work" announcements and wakes local pumps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from broker.models import Echo, Flow, Revoke, Wake
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
        #: Queues whose next wake is this broker's own enqueue's, announced by its echo: the
        #: lease sent with that enqueue has looked at the queue (or will make the pump look).
        self._echoed: set[str] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="wake listener")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        subscribe: Subscribe[Wake | Revoke | Flow | Echo] = self._tasks.wake_events
        await listen_forever(
            "wake listener", subscribe, self.connected, self._connected, self._event
        )

    def _connected(self) -> None:
        self._echoed.clear()  # an echo whose wake was lost with the connection
        self._dispatcher.notify_all()
        self._reconnected()

    def _event(self, event: Wake | Revoke | Flow | Echo) -> None:
        if isinstance(event, Revoke):
            self._revoke(event.task_id, event.lease_id)
        elif isinstance(event, Flow):
            self._flow(event.queue)
        elif isinstance(event, Echo):
            # One script publishes the echo and then the wake, so nothing comes between them.
            self._echoed.add(event.queue)
        elif event.queue in self._echoed:
            # Every other replica still hears this wake; here it would cost a lease call that
            # finds what the enqueue's own lease already took.
            self._echoed.discard(event.queue)
        else:
            self._dispatcher.notify(event.queue)
