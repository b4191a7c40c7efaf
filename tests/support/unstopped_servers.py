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
import weakref
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

    def install(self) -> None:
        original: Callable[..., grpc.aio.Server] = grpc.aio.server

        def server(*args: Any, **kwargs: Any) -> grpc.aio.Server:
            made = original(*args, **kwargs)
            self._track(made)
            return made

        grpc.aio.server = server

    def _track(self, server: grpc.aio.Server) -> None:
        # The wrappers reach their server by a weak reference: a strong one would make a cycle
        # (server -> wrapper -> server), and a server freed by refcount would wait for the
        # garbage collector instead.
        server_class, server_ref, key = type(server), weakref.ref(server), id(server)

        def alive() -> grpc.aio.Server:
            made = server_ref()
            assert made is not None  # its start or stop is being called
            return made

        async def tracked_start() -> None:
            await server_class.start(alive())
            self._running[key] = f"{os.environ.get('PYTEST_CURRENT_TEST', '?')} at {_starter()}"

        async def tracked_stop(grace: float | None) -> None:
            await server_class.stop(alive(), grace)
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
