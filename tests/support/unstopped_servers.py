"""Guards the test process against grpc.aio servers that are garbage collected unstopped.

grpc.aio logs such a server at DEBUG with the dying server itself as a log argument. pytest's
log capture (log_level DEBUG) keeps that record after the server's memory is freed, and freeing
the record later crashes the whole run with SIGSEGV, in whichever test happens to be running.
The guard drops the record at its logger, before any handler can keep it, and counts it, so
the session can fail on the leak itself instead of crashing somewhere else.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable
from typing import Any

import grpc

GRPC_LOGGER = "grpc._cython.cygrpc"
_MESSAGE = "__dealloc__ called on running server"


class UnstoppedServerGuard(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.unstopped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_MESSAGE):
            self.unstopped += 1
            return False
        return True

    def install(self) -> None:
        logging.getLogger(GRPC_LOGGER).addFilter(self)


class StartedServers:
    """Names the test that leaks a server: wraps grpc.aio.server so that each server started
    is remembered until its stop() has finished. The guard above only counts a leak when the
    garbage collector frees it, in whichever test runs then; this says which test left it."""

    def __init__(self) -> None:
        self._running: dict[int, str] = {}  # id(server) -> what started it
        self._original: Callable[..., grpc.aio.Server] | None = None

    def install(self) -> None:
        self._original = original = grpc.aio.server

        def server(*args: Any, **kwargs: Any) -> grpc.aio.Server:
            made = original(*args, **kwargs)
            self._track(made)
            return made

        grpc.aio.server = server

    def _track(self, server: grpc.aio.Server) -> None:
        start, stop = server.start, server.stop
        key = id(server)

        async def tracked_start() -> None:
            await start()
            self._running[key] = f"{os.environ.get('PYTEST_CURRENT_TEST', '?')} at {_starter()}"

        async def tracked_stop(grace: float | None) -> None:
            await stop(grace)
            self._running.pop(key, None)

        server.start = tracked_start  # type: ignore[method-assign]
        server.stop = tracked_stop  # type: ignore[method-assign]

    def left_running(self) -> list[str]:
        """Where each server still running was started; forgets them."""
        starters = list(self._running.values())
        self._running.clear()
        return starters


def _starter() -> str:
    """The innermost frame outside this module and grpc: the code that started the server."""
    for frame in traceback.extract_stack()[::-1]:
        if frame.filename != __file__ and "/grpc/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "unknown"
