"""Keeps large buffers in the heap (glibc), so copying a big request does not stall the event
loop on page faults.

A 4 MiB Enqueue is copied a few times on its way (gRPC's buffer, the request's bytes, each
payload, the command to Redis). glibc serves each of those allocations with a fresh mmap and
unmaps it when freed, so every copy first faults in and zeroes a new page per 4 KiB: the loop
stalled for 5-18 ms at a time beside a client sending 4 MiB calls, and other clients waited
(docs/benchmarks.md, "a noisy neighbour"). Allocations up to 32 MiB now come from the heap,
and freed memory is kept for reuse up to TRIM_THRESHOLD_BYTES before it is given back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
#: Allocations below this come from the heap (32 MiB is the most glibc allows on 64 bits).
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
#: Free memory at the top of the heap kept for reuse rather than given back to the system.
TRIM_THRESHOLD_BYTES = 128 * 1024 * 1024
#: Extra the heap grows by at once, so a run of big allocations does not grow it each time.
TOP_PAD_BYTES = 16 * 1024 * 1024


def keep_large_buffers_in_heap() -> bool:
    """Tunes glibc's malloc for this process (call before serving). Returns False, and leaves
    the allocator as it is, where the C library is not glibc (e.g. musl)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        log.debug("the C library is not glibc: its allocator is left as it is")
        return False
    for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (_M_TOP_PAD, TOP_PAD_BYTES),
    ):
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"glibc refused mallopt({param}, {value})")
    return True
