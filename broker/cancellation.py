"""Cancellation that survives libraries which turn CancelledError into their own errors."""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Re-raises CancelledError in a task that was asked to stop.

    redis-py can surface a cancellation as a connection error; a loop that catches that error to
    retry would otherwise never stop. Call this first in such an except block.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
