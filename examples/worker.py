"""A worker running both handlers: `taskbroker worker examples.worker:make_worker`."""

from __future__ import annotations

from examples.handlers import process_image, send_email
from taskbroker import Client, Worker


def make_worker(client: Client) -> Worker:
    """The worker the CLI runs (it passes a Client for --target)."""
    return Worker(
        client,
        queues=["emails", "images"],
        handlers=[send_email, process_image],
        concurrency=32,
    )
