"""What the HTTP side may read of the live Lease streams: a read-only view, so the dashboard and
/metrics show workers without depending on the gRPC layer that serves the streams."""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol


class LiveStream(Protocol):
    """One open Lease stream, as the workers view shows it."""

    @property
    def stream_id(self) -> str: ...
    @property
    def worker_id(self) -> str:
        """As the worker named itself in its open frame ('' if it did not)."""
        ...

    @property
    def queues(self) -> tuple[str, ...]: ...
    @property
    def opened_ms(self) -> int:
        """When the stream opened, epoch ms."""
        ...

    @property
    def credits(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def closed(self) -> bool: ...


class LiveStreams(Protocol):
    """The streams open on this replica (broker/api/lease_session.py's SessionRegistry)."""

    @property
    def sessions(self) -> Collection[LiveStream]: ...
