"""WakeListener: hears every replica's "queue has work" announcements and wakes local pumps."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from broker.cancellation import raise_if_cancelled
from broker.errors import BrokerError

if TYPE_CHECKING:
    from broker.dispatch import Dispatcher
    from broker.store.redis_store import RedisStore

log = logging.getLogger(__name__)


class WakeListener:
    """Subscribes to the wake channel; reconnects with backoff, and after a reconnect wakes every
    pump, since announcements made while disconnected were lost."""

    def __init__(self, store: RedisStore, dispatcher: Dispatcher) -> None:
        self._store = store
        self._dispatcher = dispatcher
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
                async with self._store.wake_subscription() as pubsub:
                    self.connected.set()
                    self._dispatcher.notify_all()
                    delay = 0.05
                    while True:
                        raise_if_cancelled()
                        # A bounded wait, so a quiet channel is not mistaken for a dead socket.
                        message = await pubsub.get_message(timeout=1.0)
                        if message and message.get("type") == "message":
                            data = message["data"]
                            queue = data.decode() if isinstance(data, bytes) else str(data)
                            self._dispatcher.notify(queue)
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
