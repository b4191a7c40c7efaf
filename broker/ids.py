"""Names and ids: the grammar of queue and type names, and time-ordered task ids."""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Final

from broker.errors import InvalidArgument
from broker.models import TaskRef

#: Letters, digits, `_ - .`: no braces (hash tags), colons (key separators), globs, whitespace or
#: control characters, so a name cannot move or alias another queue's keys (RELIABILITY.md 4.3).
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
MAX_NAME_LENGTH: Final = 128

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: A group key (TaskSpec.group_key): it ends up in key names, so no braces (hash tags).
GROUP_KEY_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
LOCAL_ID_PATTERN: Final = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")


def check_name(field: str, value: str) -> str:
    """Returns value if it is a valid queue, type or header name.

    Raises:
        InvalidArgument: naming the field.
    """
    if not value:
        raise InvalidArgument(field, "required")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidArgument(field, f"longer than {MAX_NAME_LENGTH} characters")
    if not NAME_PATTERN.fullmatch(value):
        raise InvalidArgument(field, "only letters, digits, '_', '-' and '.' are allowed")
    return value


def parse_task_id(field: str, task_id: str) -> TaskRef:
    """Splits a public task id "<queue>:<local id>".

    Raises:
        InvalidArgument: the id is not one the broker could have issued.
    """
    queue, sep, local_id = task_id.rpartition(":")
    if not task_id:
        raise InvalidArgument(field, "required")
    if not sep or not NAME_PATTERN.fullmatch(queue) or not LOCAL_ID_PATTERN.fullmatch(local_id):
        raise InvalidArgument(field, "not a task id (expected <queue>:<26-character id>)")
    return TaskRef(queue, local_id)


class IdGenerator:
    """ULID-style local ids: 48-bit ms time + 80 bits, Crockford base32, monotonic per process,
    so ids sort by creation and break ties between same-millisecond tasks in FIFO order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._last_random = 0

    def new(self) -> str:
        return self.new_many(1)[0]

    def new_many(self, n: int) -> list[str]:
        """n ids in order, for one call's tasks: one clock read and one lock for them all."""
        with self._lock:
            now = time.time_ns() // 1_000_000
            if now <= self._last_ms:
                now = self._last_ms
                first = self._last_random + 1
            else:
                first = int.from_bytes(os.urandom(10), "big") >> 1
            self._last_ms = now
            self._last_random = first + n - 1
        high = now << 80
        # Two characters (10 bits) per lookup: half the steps of one per character, and an
        # id is made for every task enqueued.
        pairs = _CROCKFORD_PAIRS
        return [
            "".join([pairs[value >> shift & 1023] for shift in _PAIR_SHIFTS])
            for value in [high | (r & _RANDOM_MASK) for r in range(first, first + n)]
        ]


#: Every two-character string of Crockford's alphabet, indexed by its 10-bit value.
_CROCKFORD_PAIRS: Final = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_PAIR_SHIFTS: Final = tuple(range(120, -1, -10))  # 13 pairs: the 26 characters of 130 bits
_RANDOM_MASK: Final = (1 << 80) - 1  # the bits after the 48-bit time
#: Crockford's characters to the digits int(..., 32) reads, character by character.
_CROCKFORD_TO_DIGITS: Final = str.maketrans(_CROCKFORD, "0123456789abcdefghijklmnopqrstuv")


def entry_id(local_id: str) -> str:
    """The Redis stream entry id a fresh pending task is stored under (docs/data-model.md):
    its id's 48-bit time in ms, and the low 64 bits of the rest as the sequence. Ids from one
    generator increase, so do their entry ids: the order a stream requires."""
    value = int(local_id.translate(_CROCKFORD_TO_DIGITS), 32)
    return f"{value >> 80}-{value & 0xFFFF_FFFF_FFFF_FFFF}"


def new_lease_id() -> str:
    """A random 128-bit lease id: unguessable and never reissued, even after a failover."""
    return os.urandom(16).hex()
