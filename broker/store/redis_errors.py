"""Redis failures in words: what a client is told when Redis cannot serve its call.

A redis-py class name (``ConnectionError``) or its text (hosts, ports) tells a client nothing it
can act on; each message says what happened and whether to retry, and never carries the Redis
URL or its password.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import redis.exceptions as rex
from redis.asyncio import connection as _connection

RETRY: Final = "; retry"
_CREDENTIALS: Final = (
    "Redis refused the broker's credentials; the broker's operator must correct its Redis URL"
)

#: Checked in order: subclasses before their bases.
_BY_CLASS: Final[tuple[tuple[type[BaseException], str], ...]] = (
    (rex.AuthenticationError, _CREDENTIALS),
    (rex.AuthorizationError, _CREDENTIALS),
    (rex.BusyLoadingError, "Redis is loading its data after a restart" + RETRY),
    (rex.MaxConnectionsError, "all of the broker's Redis connections are busy" + RETRY),
    (rex.ReadOnlyError, "Redis is a read-only replica (a failover may be under way)" + RETRY),
    (rex.MasterDownError, "the Redis primary is down (a failover may be under way)" + RETRY),
    (rex.ClusterDownError, "the Redis Cluster is down or failing over" + RETRY),
    (rex.TryAgainError, "the Redis Cluster is moving this queue's slot" + RETRY),
    (rex.TimeoutError, "Redis did not answer in time" + RETRY),
)

#: The same conditions, when Redis reports them inside a script as an error reply.
_BY_PREFIX: Final = {
    "LOADING": "Redis is loading its data after a restart",
    "READONLY": "Redis is a read-only replica (a failover may be under way)",
    "MASTERDOWN": "the Redis primary is down (a failover may be under way)",
    "CLUSTERDOWN": "the Redis Cluster is down or failing over",
    "TRYAGAIN": "the Redis Cluster is moving this queue's slot",
}


def unavailable_message(exc: BaseException) -> str:
    """A sentence for a client whose call failed because Redis could not serve it."""
    for cls, text in _BY_CLASS:
        if isinstance(exc, cls):
            return text
    text = str(exc)
    if isinstance(exc, rex.ResponseError):
        return _BY_PREFIX.get(text.split(" ", 1)[0], "Redis refused the call") + RETRY
    lowered = text.lower()
    if "refused" in lowered:
        return "the broker cannot reach Redis (connection refused)" + RETRY
    if "timeout" in lowered or "timed out" in lowered:
        return "the broker cannot reach Redis (no answer in time)" + RETRY
    return "the broker lost its connection to Redis" + RETRY


def is_unavailable_reply(exc: rex.ResponseError) -> bool:
    """An error reply that means "not now" (loading, failover), not a broken command."""
    return str(exc).split(" ", 1)[0] in _BY_PREFIX


_CONNECTION_MODULE: Final = Path(_connection.__file__).resolve()


def is_connection_torn_down(exc: BaseException) -> bool:
    """An AttributeError or TypeError raised inside redis-py's connection code: writing to a
    connection whose transport was torn down meanwhile (Redis closed it, a failover) leaks as
    one of these rather than a ConnectionError (redis-py issue #4287). It means "the connection
    is gone", the same as a ConnectionError; any other such error is a bug and stays one."""
    if not isinstance(exc, AttributeError | TypeError):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == _CONNECTION_MODULE:
            return True
        tb = tb.tb_next
    return False
