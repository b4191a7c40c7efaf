"""Counts the settlements in a large Lease frame from its bytes, a slice at a time, before the
frame is parsed: a frame far past max_settlements_per_frame (150,000 acks, 8 MB) took 14-26 ms
of parsing in one event-loop step only to be refused, and every other client waited behind it
(docs/benchmarks.md, "2026-12-06, night"). Scanned first, it is refused after limit + 1 items,
in steps of SCAN_SLICE items.

Field numbers follow proto/taskbroker/v1/lease.proto: LeaseRequest.settlements = 6;
Settlements.acks = 1, nacks = 2, extends = 3 (each an embedded message). The count is exact
for what it counts, and it gives up (None) on anything it does not fully understand, so the
caller then parses as before and the frame is answered as it always was. One difference: the
items past the limit are not read, so a frame past it whose later bytes are malformed is
refused for its size rather than as malformed (INVALID_ARGUMENT either way).
"""

from __future__ import annotations

import asyncio
from typing import Final

#: LeaseRequest.settlements: field 6, length-delimited.
_SETTLEMENTS_KEY: Final = (6 << 3) | 2
#: Settlements' repeated message fields: acks, nacks, extends.
_ITEM_FIELDS: Final = frozenset({1, 2, 3})
#: Items counted between yields to the event loop (about 0.4 ms of scanning here).
SCAN_SLICE: Final = 1024
#: Frames up to this size are parsed at once (at 2 bytes an item at the least, a few tens of
#: thousands of items: about a millisecond to parse).
SCAN_FROM_BYTES: Final = 64 * 1024

_VARINT: Final = 0
_FIXED64: Final = 1
_LEN: Final = 2
_FIXED32: Final = 5


class _Unreadable(Exception):
    """The bytes are not the simple shape this scan reads: let the parser judge them."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The varint at pos, and the position after it."""
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Unreadable
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _skip(buf: bytes, pos: int, wire_type: int) -> int:
    """The position after a field's value of this wire type (groups are not read)."""
    if wire_type == _VARINT:
        return _varint(buf, pos)[1]
    if wire_type == _FIXED64:
        return pos + 8
    if wire_type == _LEN:
        length, pos = _varint(buf, pos)
        return pos + length
    if wire_type == _FIXED32:
        return pos + 4
    raise _Unreadable


async def settlement_count(raw: bytes, stop_after: int) -> int | None:
    """How many acks, nacks and extensions the frame holds, counting no further than
    stop_after + 1; None when the frame is not a settlements frame (then any other frame kind,
    and malformed bytes, are for the parser to judge). Yields to the event loop every
    SCAN_SLICE items."""
    try:
        return await _count(raw, stop_after)
    except _Unreadable:
        return None


async def _count(raw: bytes, stop_after: int) -> int | None:
    count = 0
    pos = 0
    # A message field that appears more than once is merged: its repeated items add up.
    while pos < len(raw):
        key, pos = _varint(raw, pos)
        if key != _SETTLEMENTS_KEY:
            return None  # another frame kind (a oneof's last member wins): not ours to judge
        length, pos = _varint(raw, pos)
        end = pos + length
        if end > len(raw):
            raise _Unreadable
        if count > stop_after:
            pos = end  # past the limit already: only the frame's kind is left to check
            continue
        count, pos = await _count_items(raw, pos, end, count, stop_after)
    return count


async def _count_items(
    raw: bytes, pos: int, end: int, count: int, stop_after: int
) -> tuple[int, int]:
    """Counts the items of one settlements field from pos to end, onto count; stops once
    count passes stop_after (then returns end: the rest of this field is not read)."""
    while pos < end:
        key = raw[pos]
        size = raw[pos + 1] if pos + 1 < end else 0x80
        if key < 0x80 and size < 0x80 and key & 7 == _LEN:  # most items: one byte each
            pos += 2 + size
        else:
            key, pos = _varint(raw, pos)
            pos = _skip(raw, pos, key & 7)
        if key & 7 == _LEN and key >> 3 in _ITEM_FIELDS:
            count += 1
            if count > stop_after:
                return count, end
            if count % SCAN_SLICE == 0:
                await asyncio.sleep(0)
    if pos != end:
        raise _Unreadable
    return count, end
