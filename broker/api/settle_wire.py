"""A `SettleResults` frame written as bytes, one answer at a time, with no message object per
answer: each answer is the encoding of `results` (field 1) holding one `SettleResult`, so
answers concatenate into a valid `SettleResults` (the outbox merges frames the same way).

Field numbers and enum values follow proto/taskbroker/v1/lease.proto; tests/api/
test_settle_wire.py parses every shape back with the generated code."""

from __future__ import annotations

from typing import Final

from broker.api.outbox import varint, wrap

#: SettleResult's fields: task_id = 1, lease_id = 2, kind = 3, outcome = 4, message = 5,
#: already_settled = 6, lease_expire_time = 7 (a Timestamp: seconds = 1, nanos = 2).
_TASK_ID: Final = 0x0A
_LEASE_ID: Final = 0x12
_KIND: Final = 0x18
_OUTCOME: Final = 0x20
_MESSAGE: Final = 0x2A
_ALREADY: Final = 0x30
_EXPIRE: Final = 0x3A
#: SettleResults.results = 1.
_RESULTS: Final = 0x0A

OUTCOME_OK: Final = 1


def _string(tag: int, text: str) -> bytes:
    data = text.encode()
    return bytes((tag,)) + varint(len(data)) + data


def _timestamp(ms: int) -> bytes:
    """A Timestamp's encoding (ms already within the Timestamp range: convert._ts clamps)."""
    seconds, nanos = ms // 1000, (ms % 1000) * 1_000_000
    out = b""
    if seconds:  # int64: a negative value is its 64-bit two's complement
        out += b"\x08" + varint(seconds & 0xFFFF_FFFF_FFFF_FFFF)
    if nanos:
        out += b"\x10" + varint(nanos)
    return out


def answer(
    task_id: str,
    lease_id: str,
    kind: int,
    outcome: int,
    message: str = "",
    already_settled: bool = False,
    expire_ms: int | None = None,
) -> bytes:
    """One answer as a `SettleResults` fragment (proto3: default values are left out)."""
    body = _string(_TASK_ID, task_id) if task_id else b""
    if lease_id:
        body += _string(_LEASE_ID, lease_id)
    if kind:
        body += bytes((_KIND, kind))
    if outcome:
        body += bytes((_OUTCOME, outcome))
    if message:
        body += _string(_MESSAGE, message)
    if already_settled:
        body += bytes((_ALREADY, 1))
    if expire_ms is not None:
        body += wrap(_EXPIRE >> 3, _timestamp(expire_ms))
    return bytes((_RESULTS,)) + varint(len(body)) + body


def ok_answer(task_id: str, lease_id: str, tail: bytes) -> bytes:
    """The common answer, an applied settlement, with its constant tail (`ok_tail`)."""
    tid, lid = task_id.encode(), lease_id.encode()
    length = 4 + len(tid) + len(lid) + len(tail)
    if length < 0x80 and tid and lid:  # every real pair of ids: one-byte lengths
        head = bytes((_RESULTS, length, _TASK_ID, len(tid)))
        return head + tid + bytes((_LEASE_ID, len(lid))) + lid + tail
    return answer(task_id, lease_id, tail[1], OUTCOME_OK, already_settled=len(tail) > 4)


def ok_tail(kind: int, already_settled: bool) -> bytes:
    """The bytes an applied settlement's answer ends with: its kind and outcome (and the repeat
    flag)."""
    repeat = bytes((_ALREADY, 1)) if already_settled else b""
    return bytes((_KIND, kind, _OUTCOME, OUTCOME_OK)) + repeat
