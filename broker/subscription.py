"""listen_forever: a Pub/Sub subscription kept open for the process's life, for the wake
listener and the watch hub alike."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeAlias, TypeVar

from broker.cancellation import raise_if_cancelled
from broker.errors import BrokerError

log = logging.getLogger(__name__)

E = TypeVar("E", covariant=True)
Event = TypeVar("Event")

#: A bounded wait for the next announcement, so a quiet channel is not mistaken for a dead
#: socket (the events' next() checks the connection's health between waits).
LISTEN_TIMEOUT_S = 1.0


class Events(Protocol[E]):
    """One subscription's announcements (store's WakeEvents, FinishedEvents)."""

    async def next(self, timeout_s: float) -> E | None: ...


#: What opens a subscription (TaskQueue.wake_events, TaskQueue.finished_events).
Subscribe: TypeAlias = Callable[[], AbstractAsyncContextManager[Events[Event]]]


async def listen_forever(
    name: str,
    subscribe: Subscribe[Event],
    connected: asyncio.Event,
    on_connect: Callable[[], None],
    on_event: Callable[[Event], None],
) -> None:
    """Hands every announcement to on_event until cancelled. A broken subscription is opened
    again with backoff (50 ms, doubling to 1 s); on_connect runs at every (re)connect, since
    announcements made while disconnected were lost. `connected` is set while subscribed."""
    delay = 0.05
    while True:
        try:
            async with subscribe() as events:
                connected.set()
                on_connect()
                delay = 0.05
                while True:
                    raise_if_cancelled()
                    event = await events.next(timeout_s=LISTEN_TIMEOUT_S)
                    if event is not None:
                        on_event(event)
        except asyncio.CancelledError:
            raise
        except (BrokerError, OSError, ConnectionError) as exc:
            raise_if_cancelled()
            log.debug("%s disconnected: %s", name, exc)
        except Exception as exc:  # redis-py raises its own ConnectionError subclasses here
            raise_if_cancelled()
            log.debug("%s disconnected: %s", name, type(exc).__name__)
        connected.clear()
        raise_if_cancelled()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
