"""`python -m broker`: parse settings, run the broker until SIGINT/SIGTERM (with `--processes N`,
a supervisor of N broker processes: broker/supervisor.py)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys

from broker.allocator import keep_large_buffers_in_heap
from broker.app import Broker, UnsafeRedis
from broker.auth.policy import PolicyError
from broker.config import Settings, ignored_variables, load_settings
from broker.errors import BrokerError
from broker.process_slot import ProcessSlot
from broker.supervisor import (
    SERVING_PROCESS_ARG,
    Supervisor,
    die_with_supervisor,
    on_signals,
    read_start,
)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: A serving process of a supervisor names itself in every line: they share one log.
SERVING_PROCESS_LOG_FORMAT = "%(asctime)s %(levelname)s [pid %(process)d] %(name)s: %(message)s"


def freeze_startup_objects() -> None:
    """Takes what start-up left alive (modules, classes, protobuf descriptors, about 76,000
    objects) out of the cyclic garbage collector's passes. A full pass walked them all and
    stalled the event loop for 27-36 ms under heavy traffic while every other client waited
    (docs/benchmarks.md, "2026-12-06: the garbage collector"). Reference counting still frees
    them when they go."""
    gc.collect()
    gc.freeze()


async def serve(settings: Settings, slot: ProcessSlot | None = None) -> int:
    """Runs one broker until SIGINT/SIGTERM (a serving process of a supervisor: SIGTERM only,
    from the supervisor). Returns the exit code: 0, or 2 when it cannot start."""
    keep_large_buffers_in_heap()
    # Before starting: a SIGTERM that comes while the broker starts (or just after it says it
    # serves) stops it once started, rather than killing it and orphaning its embedded Redis.
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM) if slot is None else (signal.SIGTERM,)
    with on_signals(signals, stop.set):
        broker = Broker(settings, slot=slot)
        try:
            await broker.start()
        except (UnsafeRedis, RuntimeError, BrokerError, PolicyError) as exc:
            logging.getLogger("broker").error("cannot start: %s", exc)
            return 2
        freeze_startup_objects()  # after the handlers: a SIGTERM meanwhile drains the broker
        await stop.wait()
        await broker.stop()
        return 0


def serve_for_supervisor() -> int:
    """A serving process: settings and slot from stdin, then one broker on the shared port."""
    # Ctrl-C reaches the whole process group; the supervisor alone decides, and sends SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=SERVING_PROCESS_LOG_FORMAT)
    try:
        start = read_start(sys.stdin.buffer)
        die_with_supervisor(start.supervisor_pid)
    except RuntimeError as exc:
        logging.getLogger("broker").error("cannot start: %s", exc)
        return 2
    logging.getLogger().setLevel(start.settings.log_level.upper())
    return asyncio.run(serve(start.settings, start.slot))


def main() -> None:
    if sys.argv[1:] == [SERVING_PROCESS_ARG]:
        sys.exit(serve_for_supervisor())
    settings = load_settings()
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    for warning in ignored_variables(os.environ):
        logging.getLogger("broker").warning("%s", warning)
    if settings.processes > 1:
        sys.exit(asyncio.run(Supervisor(settings).run()))
    sys.exit(asyncio.run(serve(settings)))


if __name__ == "__main__":
    main()
