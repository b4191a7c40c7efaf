"""Counts the event loop's turns given to another coroutine: how tests see that a long piece
of work yields to other clients (and that a short one does not)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Turns:
    """How many times the other coroutine ran since the block began."""

    def __init__(self) -> None:
        self.count = 0


@asynccontextmanager
async def other_client_turns() -> AsyncIterator[Turns]:
    """Runs a coroutine that counts each turn it gets, for the duration of the block."""
    ran = Turns()
    started = asyncio.Event()

    async def other_client() -> None:
        started.set()
        while True:
            await asyncio.sleep(0)
            ran.count += 1

    other = asyncio.create_task(other_client())
    await started.wait()  # it now waits for its first turn back: count from here
    try:
        yield ran
    finally:
        other.cancel()
