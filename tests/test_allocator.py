"""The broker keeps large buffers in glibc's heap: a big request's copies reuse memory instead
of each mapping (and faulting in) fresh pages."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import ctypes
from broker.allocator import keep_large_buffers_in_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mapped_while_holding(size):
    before = libc.mallinfo2().hblkhd
    buffer = bytearray(size)
    mapped = libc.mallinfo2().hblkhd - before
    del buffer
    return mapped

print(mapped_while_holding(4 << 20), keep_large_buffers_in_heap(), mapped_while_holding(4 << 20))
"""


def test_a_4_mib_buffer_comes_from_the_heap_once_tuned() -> None:
    # A fresh interpreter: the test process's allocator has its own history.
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    untuned, tuned, after = int(out[0]), out[1], int(out[2])
    assert untuned >= 4 << 20  # glibc's default: a mapping of its own
    assert tuned == "True"
    assert after == 0
