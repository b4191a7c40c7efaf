"""What the numbers were measured on: they mean little without the machine they came from."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import grpc
import redis


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def machine_info(redis_version: str) -> dict[str, Any]:
    """CPU, memory, OS, and the versions of Python, Redis, grpcio and redis-py."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "redis_server": redis_version,
        "grpcio": grpc.__version__,
        "redis_py": redis.__version__,
        "load_avg_at_start": list(os.getloadavg()),
    }
