"""Outbox: the frames waiting to be written to one Lease stream, counted in bytes.

Frames are kept encoded. Frames of a mergeable kind (deliveries, settle results) queued behind
one another are written as one frame (fewer, larger writes under load) without re-encoding: each
is kept as the encoding of its inner message (`Deliveries`, `SettleResults`), whose only field is
repeated, so the encodings concatenate into one valid inner message, which is then wrapped once
in the `LeaseResponse` field. (Concatenating whole `LeaseResponse` frames would rely on parsers
merging a oneof message field that occurs twice; protobufjs, for one, keeps only the last.)
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

#: Merged frames stop growing here; one large task may exceed it (gRPC's limit is 16 MiB above
#: the task size limit).
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
#: Kinds whose frames may be merged: repeated contents, no meaning in the frame boundary.
MERGEABLE: Final = frozenset({"deliveries", "settle_results"})


@dataclass(slots=True)
class Message:
    """One frame to write: its kind, its encoding (for a mergeable kind, the encoding of the
    inner message only), and the leases it delivers (if any)."""

    kind: str
    data: bytes
    lease_ids: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Write:
    """What the writer sends: the frame's bytes on the wire, the bytes it counted for in the
    outbox, and the leases it delivers."""

    data: bytes
    size: int
    lease_ids: list[str]


def varint(value: int) -> bytes:
    """A protobuf varint (one byte for the small values most fields hold)."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def wrap(field_number: int, inner: bytes) -> bytes:
    """The encoding of a message whose only field set is `field_number`, holding `inner`."""
    return varint(field_number << 3 | 2) + varint(len(inner)) + inner


class Outbox:
    """Frames for one stream, written in order by one writer. Bounded in bytes: past the bound
    the stream is not offered more tasks (`full`) and answers wait (`put`) until the worker
    reads. `on_space` is called when a full outbox drains below the bound."""

    def __init__(
        self, limit_bytes: int, on_space: Callable[[], None], field_numbers: dict[str, int]
    ) -> None:
        self._limit = limit_bytes
        #: The LeaseResponse field of each mergeable kind, to wrap merged inner messages in.
        self._field_numbers = field_numbers
        self._on_space = on_space
        self._queue: deque[Message | None] = deque()
        self._bytes = 0
        self._closed = False
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()

    @property
    def full(self) -> bool:
        return self._bytes >= self._limit

    def put_nowait(self, message: Message) -> None:
        """Queues a frame whatever the bound (deliveries are bounded by `full` upstream)."""
        self._queue.append(message)
        self._bytes += len(message.data)
        if self.full:
            self._space.clear()
        self._ready.set()

    async def put(self, message: Message) -> None:
        """Queues a frame once the outbox is below its bound (backpressure on answers); once
        the outbox is closed the frame is dropped (nobody will write it)."""
        while self.full and not self._closed:
            await self._space.wait()
        if not self._closed:
            self.put_nowait(message)

    def close(self) -> None:
        """The writer stops after what is queued; frames put from now on are dropped."""
        self._closed = True
        self._space.set()  # waiters give up
        self._queue.append(None)
        self._ready.set()

    async def get(self) -> Write | None:
        """The next write: a frame, merged with the frames of its kind right behind it; None
        once closed."""
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        first = self._queue.popleft()
        if first is None:
            return None
        if first.kind not in MERGEABLE:
            return Write(first.data, len(first.data), first.lease_ids)
        parts, lease_ids, size = [first.data], list(first.lease_ids), len(first.data)
        while self._queue and (nxt := self._queue[0]) is not None and nxt.kind == first.kind:
            if size + len(nxt.data) > MAX_MESSAGE_BYTES:
                break
            self._queue.popleft()
            parts.append(nxt.data)
            lease_ids += nxt.lease_ids
            size += len(nxt.data)
        inner = parts[0] if len(parts) == 1 else b"".join(parts)
        return Write(wrap(self._field_numbers[first.kind], inner), size, lease_ids)

    def written(self, write: Write) -> None:
        """A write finished: its bytes no longer count."""
        was_full = self.full
        self._bytes -= write.size
        if not self.full:
            self._space.set()
            if was_full:
                self._on_space()
