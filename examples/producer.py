"""The producer: 100 emails (every tenth at high priority) and 10 delayed image tasks."""

from __future__ import annotations

import random
from datetime import timedelta

from taskbroker import Client, NewTask, json_payload


async def produce(client: Client, time_scale: float) -> list[str]:
    """Enqueues the scenario's tasks. Returns their ids."""
    emails = [
        NewTask(
            "emails",
            "send_email",
            json_payload({"to": f"user{i}@example.com", "template": "welcome"}),
            priority=10 if i % 10 == 0 else 0,
            max_attempts=5,
            initial_backoff=timedelta(milliseconds=200 * time_scale),
            max_backoff=timedelta(seconds=5 * time_scale),
        )
        for i in range(100)
    ]
    images = [
        NewTask(
            "images",
            "process_image",
            json_payload({"image_id": i, "sizes": [128, 512]}),
            # "Delayed by up to a few minutes", scaled down for the demo.
            delay=timedelta(seconds=random.uniform(0, 180) * time_scale),
            max_attempts=3,
            initial_backoff=timedelta(milliseconds=200 * time_scale),
        )
        for i in range(10)
    ]
    results = await client.enqueue_many([*emails, *images])
    return [r.task_id for r in results]
