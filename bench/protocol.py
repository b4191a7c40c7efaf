"""The child side of the bench's process protocol: one JSON object per stdout line.

Children (workers, producers, idle streams) are separate processes so that their CPU is not the
broker's or the bench's, and so that a worker can be SIGKILLed. They say what happened, with
wall-clock times, on stdout; the parent reads it (bench.children.Child).
"""

from __future__ import annotations

import json
import sys
from typing import Any


def emit(event: str, **fields: Any) -> None:
    """Writes one event line and flushes it at once (the parent may be waiting on it)."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()
