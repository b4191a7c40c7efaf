"""Two handlers with the blog post's failure rates and durations, scaled by TIME_SCALE."""

from __future__ import annotations

import asyncio
import os
import random
import time

from taskbroker import TaskContext, handler

#: 1.0 is the blog post's timing; the demo runs at 0.1 so it finishes in well under a minute.
TIME_SCALE = float(os.environ.get("TASKBROKER_DEMO_TIME_SCALE", "1.0"))


class SMTPError(Exception):
    """A simulated, transient mail server failure."""


@handler("send_email")
async def send_email(ctx: TaskContext, payload: bytes) -> bytes:
    """Sends one email: 100-500 ms, about 5% transient SMTP failures (retried by the broker)."""
    await asyncio.sleep(random.uniform(0.1, 0.5) * TIME_SCALE)
    if random.random() < 0.05:
        raise SMTPError("451 temporary failure, try again later")
    return b"sent"


@handler("process_image")
def process_image(ctx: TaskContext, payload: bytes) -> bytes:
    """Resizes one image: 0.5-2.5 s of CPU-ish work in a thread, about 3% failures."""
    time.sleep(random.uniform(0.5, 2.5) * TIME_SCALE)
    if random.random() < 0.03:
        raise RuntimeError("corrupt image data")
    return b"thumbnail stored"
