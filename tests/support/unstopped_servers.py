"""Guards the test process against grpc.aio servers that are garbage collected unstopped.

grpc.aio logs such a server at DEBUG with the dying server itself as a log argument. pytest's
log capture (log_level DEBUG) keeps that record after the server's memory is freed, and freeing
the record later crashes the whole run with SIGSEGV, in whichever test happens to be running.
The guard drops the record at its logger, before any handler can keep it, and counts it, so
the session can fail on the leak itself instead of crashing somewhere else.
"""

from __future__ import annotations

import logging

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
