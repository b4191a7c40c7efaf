"""WakeListener: hears every replica's "queue has work" announcements and wakes local pumps."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from broker.cancellation import raise_if_cancelled
from broker.errors import BrokerError
from broker.models import Flow, Revoke

if TYPE_CHECKING:
    from broker.dispatch import Dispatcher
    from broker.queue import TaskQueue

log = logging.getLogger(__name__)


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
        delay = 0.05
        while True:
            try:
                async with self._tasks.wake_events() as events:
                    self.connected.set()
                    self._dispatcher.notify_all()
                    self._reconnected()
                    delay = 0.05
                    while True:
                        raise_if_cancelled()
                        # A bounded wait, so a quiet channel is not mistaken for a dead socket.
                        event = await events.next(timeout_s=1.0)
                        if isinstance(event, Revoke):
                            self._revoke(event.task_id, event.lease_id)
                        elif isinstance(event, Flow):
                            self._flow(event.queue)
                        elif event is not None:
                            self._dispatcher.notify(event.queue)
            except asyncio.CancelledError:
                raise
            except (BrokerError, OSError, ConnectionError) as exc:
                raise_if_cancelled()
                log.debug("wake listener disconnected: %s", exc)
            except Exception as exc:  # redis-py raises its own ConnectionError subclasses here
                raise_if_cancelled()
                log.debug("wake listener disconnected: %s", type(exc).__name__)
            self.connected.clear()
            raise_if_cancelled()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
